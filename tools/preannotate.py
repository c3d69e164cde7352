"""Masks for a whole project's points, from the command line: `python -m tools.preannotate --project ID`.

Reads the project's tasks through Label Studio's API (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, as the
backend reads them), makes each task's masks as the backend's /predict does for "Retrieve Predictions"
(preannotation.py: the same sources of points, the same regions), and uploads each task's prediction as soon
as it is made: an interrupted run loses nothing it uploaded, and the next run skips the tasks that have a
prediction of this model version. The masks are made by this process's own runtime (the settings of the
environment: DEVICE, DEMO, MODEL_DIR, ...), or by a running backend or fleet (`--backend URL`), which then
fetches the images itself.

    python -m tools.preannotate --project 3                 # every task of project 3
    python -m tools.preannotate --project 3 --tasks 5,9-12  # these tasks only
    python -m tools.preannotate --project 3 --limit 100     # the next 100 tasks that are not done
    python -m tools.preannotate --project 3 --dry-run       # which points would become masks, and what is wrong
    python -m tools.preannotate --project 3 --backend http://segnext:9090 --concurrency 4

Exit status: 0 when no task failed, 1 when some did (the summary says which and why), 2 for a wrong command.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import requests
from tqdm import tqdm

from label_config import parsed_label_config
from label_studio_api import LabelStudioApi, LabelStudioApiError
from preannotation import TaskError, TaskOutcome, find_points, is_done, plan_task, preannotate_tasks
from segnext_backend.runtime import DEMO_VERSION, SEGNEXT_VERSION, Runtime, load_runtime
from segnext_backend.settings import Settings

logger = logging.getLogger("preannotate")


def task_ids(text: str) -> list[int]:
    """'5,9-12' -> [5, 9, 10, 11, 12]"""
    ids = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            start, end = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a task id or a range of them (5 or 9-12)") from None
        if start < 1 or end < start:
            raise argparse.ArgumentTypeError(f"{part!r} is not a task id or a range of them (5 or 9-12)")
        ids.extend(range(start, end + 1))
    return ids


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.preannotate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--tasks", type=task_ids, help="only these task ids: 5,9-12")
    parser.add_argument("--limit", type=int, help="at most this many tasks that are not done yet")
    parser.add_argument("--dry-run", action="store_true", help="find and check the points; compute and upload nothing")
    parser.add_argument("--backend", help="a running backend (or a fleet's address) makes the masks: http://host:9090")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight to --backend (default 2)")
    parser.add_argument(
        "--prefetch", type=int, default=2, help="tasks whose images are fetched and decoded ahead (default 2)"
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.concurrency < 1 or args.prefetch < 1:
        parser.error("--concurrency and --prefetch must be at least 1")
    return args


@dataclass
class Summary:
    done: int = 0
    objects: int = 0
    images: int = 0
    skipped: int = 0  # a prediction of this model version was there already
    no_points: int = 0
    failed: list[tuple[object, str]] = field(default_factory=list)
    interrupted: bool = False

    def lines(self, dry_run: bool) -> list[str]:
        verb = "would be done" if dry_run else "done"
        lines = [
            f"tasks {verb}: {self.done} ({self.objects} objects{'' if dry_run else f', {self.images} images'})",
            f"tasks skipped (a prediction of this model version exists): {self.skipped}",
            f"tasks without points: {self.no_points}",
            f"tasks failed: {len(self.failed)}",
        ]
        lines += [f"  task {task_id}: {why}" for task_id, why in self.failed]
        if self.interrupted:
            lines.append("interrupted: what was uploaded stays; run the same command again to continue")
        return lines


class Progress:
    """A progress bar with images and objects per minute."""

    def __init__(self, total: int | None):
        self.bar = tqdm(total=total, unit="task", dynamic_ncols=True, file=sys.stderr)
        self.started = time.monotonic()
        self.images = self.objects = 0

    def update(self, outcome: TaskOutcome) -> None:
        self.images += outcome.images
        self.objects += outcome.objects
        minutes = max(time.monotonic() - self.started, 1e-6) / 60
        self.bar.set_postfix_str(f"{self.images / minutes:.1f} images/min, {self.objects / minutes:.1f} objects/min")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# -- which tasks --------------------------------------------------------------------------------------------------


def named_tasks(api: LabelStudioApi, ids: list[int], summary: Summary) -> Iterator[dict]:
    for task_id in ids:
        try:
            yield api.task(task_id)
        except LabelStudioApiError as error:  # a wrong id fails that task, not the run
            summary.failed.append((task_id, str(error)))


def project_tasks(api: LabelStudioApi, project_id: int, ids: list[int] | None, summary: Summary) -> Iterator[dict]:
    listed = named_tasks(api, ids, summary) if ids else api.tasks(project_id)
    for task in listed:
        # The task API gives only the key owner's drafts: preannotation reads all of them when none are given.
        task.pop("drafts", None)
        yield task


def to_do(
    tasks: Iterable[dict], project_id: int, model_version: str, summary: Summary, limit: int | None, on_skip
) -> Iterator[dict]:
    """The tasks that are not done, at most `limit`; the others are counted as skipped."""
    handed = 0
    for task in tasks:
        if limit is not None and handed >= limit:
            return
        if task.get("project") not in (None, project_id):
            summary.failed.append((task.get("id"), f"the task is in project {task.get('project')}, not {project_id}"))
            continue
        if is_done(task, model_version):
            summary.skipped += 1
            on_skip()
            continue
        handed += 1
        yield task


# -- three ways to go through them --------------------------------------------------------------------------------


def record(outcome: TaskOutcome, summary: Summary, api: LabelStudioApi, dry_run: bool) -> None:
    task_id = outcome.task.get("id")
    if outcome.status == "done":
        if not dry_run:
            try:
                api.create_prediction(task_id, outcome.answer)
            except LabelStudioApiError as error:
                summary.failed.append((task_id, f"uploading its prediction failed: {error}"))
                return
        summary.done += 1
        summary.objects += outcome.objects
        summary.images += outcome.images
    elif outcome.status == "skipped":
        summary.skipped += 1
    elif outcome.status == "no points":
        summary.no_points += 1
    else:
        summary.failed.append((task_id, outcome.error))


def checked_outcomes(
    tasks: Iterable[dict], parsed: dict, settings: Settings, model_version: str, api: LabelStudioApi
) -> Iterator[TaskOutcome]:
    """--dry-run: each task's points found and checked against the config and the limits; no images, no model."""
    for task in tasks:
        try:
            points = find_points(task, parsed, model_version, settings.points_data_field, api)
            if points is None:
                yield TaskOutcome(task, "no points")
                continue
            plan = plan_task(task, points, parsed, settings)
            yield TaskOutcome(task, "done", source=plan.source, objects=plan.point_count)
        except (TaskError, LabelStudioApiError) as error:
            yield TaskOutcome(task, "failed", error=str(error))


def backend_outcomes(tasks: Iterable[dict], args, label_config: str, settings: Settings) -> Iterator[TaskOutcome]:
    """--backend: each task sent alone to the backend's /predict, `--concurrency` at a time, in order."""
    session = requests.Session()
    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None

    def predict(task: dict) -> TaskOutcome:
        body = {
            "tasks": [task], "project": f"{args.project}.0", "label_config": label_config, "params": {"context": None}
        }
        try:
            response = session.post(args.backend.rstrip("/") + "/predict", json=body, auth=auth, timeout=3600)
            answer = response.json()
        except (requests.RequestException, ValueError) as error:
            return TaskOutcome(task, "failed", error=f"the backend did not answer: {type(error).__name__}")
        if response.status_code != 200:
            why = answer.get("error", "") if isinstance(answer, dict) else ""
            return TaskOutcome(task, "failed", error=f"the backend answered HTTP {response.status_code}: {why}")
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != 1:
            return TaskOutcome(task, "failed", error="the backend answered without one result for the task")
        (result,) = results
        if result == []:
            return TaskOutcome(task, "no points")
        if "result" not in result:
            error = str(result.get("error", "no result"))
            return TaskOutcome(task, "failed", error=error.removeprefix(f"task {task.get('id')}: "))
        images = len({r["to_name"] for r in result["result"]}) or 1
        return TaskOutcome(task, "done", result, objects=len(result["result"]), images=images)

    with ThreadPoolExecutor(args.concurrency) as pool:
        remaining = iter(tasks)
        window = [pool.submit(predict, task) for task in itertools.islice(remaining, args.concurrency)]
        while window:
            outcome = window.pop(0).result()
            task = next(remaining, None)
            if task is not None:
                window.append(pool.submit(predict, task))
            yield outcome


def backend_model_version(url: str, settings: Settings) -> str:
    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    deadline = time.monotonic() + 600
    while True:  # a backend that has just started answers 503 while its models load
        try:
            response = requests.get(url.rstrip("/") + "/health", auth=auth, timeout=30)
            if response.status_code == 200:
                return response.json()["model_version"]
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the backend at {url} did not report healthy within 600 s")
        time.sleep(2)


# -- the command ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, runtime: Runtime | None = None) -> int:
    """`runtime`: the models to use instead of loading the environment's (for tests)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = runtime.settings if runtime else Settings.from_env()
    try:
        api = LabelStudioApi.from_settings(settings)
        project = api.project(args.project)
    except LabelStudioApiError as error:
        print(f"cannot read project {args.project}: {error}", file=sys.stderr)
        return 2
    label_config = project.get("label_config") or ""
    parsed = parsed_label_config(label_config)

    if args.backend:
        model_version = backend_model_version(args.backend, settings)
    elif args.dry_run:
        model_version = DEMO_VERSION if settings.demo else SEGNEXT_VERSION
    else:
        runtime = runtime or load_runtime(settings)
        model_version = runtime.model_version

    summary = Summary()
    total = len(args.tasks) if args.tasks else project.get("task_number")
    progress = Progress(None if args.limit else total)  # with a limit, how many are done already is unknown
    listed = project_tasks(api, args.project, args.tasks, summary)
    tasks = to_do(listed, args.project, model_version, summary, args.limit, progress.bar.update)
    if args.dry_run:
        outcomes = checked_outcomes(tasks, parsed, settings, model_version, api)
    elif args.backend:
        outcomes = backend_outcomes(tasks, args, label_config, settings)
    else:
        outcomes = preannotate_tasks(tasks, parsed, runtime, api=api, prefetch=args.prefetch)
    try:
        for outcome in outcomes:
            record(outcome, summary, api, args.dry_run)
            progress.update(outcome)
    except KeyboardInterrupt:
        summary.interrupted = True
    except LabelStudioApiError as error:  # listing the tasks failed: what was uploaded stays
        summary.failed.append(("(listing)", str(error)))
    finally:
        progress.close()
    print(f"project {args.project}, model version {model_version}:")
    print("\n".join(summary.lines(args.dry_run)))
    return 1 if summary.failed or summary.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
