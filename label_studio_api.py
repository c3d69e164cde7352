"""The few calls of Label Studio's REST API that pre-annotation makes, with the backend's own key.

The backend reads what a batch `/predict` does not carry (a task's drafts: Label Studio 1.23 sends its
annotations and predictions, not its drafts), and `tools/preannotate.py` lists a project's tasks and uploads
predictions. Plain `requests` against the documented endpoints: label-studio-sdk 2.x is not needed for five
calls, and it pins other versions of the libraries this backend pins. Authentication is the image fetcher's
(`LabelStudioAuth`): a legacy token as `Token`, a personal access token exchanged for short-lived `Bearer`
access tokens.
"""

from __future__ import annotations

import logging
from typing import Iterator

import requests

from segnext_backend.errors import ImageUnavailableError, RequestError
from segnext_backend.images import LabelStudioAuth, host_of, task_id_for_presign
from segnext_backend.settings import Settings

logger = logging.getLogger(__name__)


class LabelStudioApiError(RequestError):
    """Label Studio could not be reached, or refused or failed a call; the message says which and why."""

    http_status = 502


class LabelStudioApi:
    def __init__(self, url: str, api_key: str, timeout: tuple[float, float] = (5.0, 60.0)):
        if not url:
            raise LabelStudioApiError("LABEL_STUDIO_URL is not set: the Label Studio API cannot be reached")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.auth = LabelStudioAuth(self.url, api_key, timeout)
        self.session = requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings) -> "LabelStudioApi":
        return cls(
            settings.label_studio_url,
            settings.label_studio_api_key,
            (settings.image_connect_timeout, settings.image_read_timeout),
        )

    def _call(self, method: str, path: str, **kwargs):
        what = f"{method} {path.split('?')[0]} at {host_of(self.url)}"
        response = None
        for refresh in (False, True):
            try:
                headers = self.auth.header(force_refresh=refresh)
            except ImageUnavailableError as error:  # the personal access token could not be exchanged
                raise LabelStudioApiError(str(error)) from None
            try:
                # Never redirected: the key goes to LABEL_STUDIO_URL's host only.
                response = self.session.request(
                    method, self.url + path, headers=headers, timeout=self.timeout, allow_redirects=False, **kwargs
                )
            except requests.RequestException as error:
                raise LabelStudioApiError(f"{what} failed: {type(error).__name__}") from None
            if not (response.status_code == 401 and self.auth.is_personal_access_token and not refresh):
                break
        if response.status_code >= 300:
            hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) else ""
            raise LabelStudioApiError(f"{what} answered HTTP {response.status_code}{hint}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise LabelStudioApiError(f"{what} answered something that is not JSON") from None

    def project(self, project_id: int) -> dict:
        return self._call("GET", f"/api/projects/{int(project_id)}")

    def task(self, task_id) -> dict:
        """The task with its annotations, predictions (and the key owner's drafts)."""
        return self._call("GET", f"/api/tasks/{task_id_for_presign(task_id)}")

    def drafts(self, task_id) -> list[dict]:
        """Every draft of the task, of every annotator."""
        drafts = self._call("GET", f"/api/tasks/{task_id_for_presign(task_id)}/drafts")
        if not isinstance(drafts, list):
            raise LabelStudioApiError(f"the drafts of task {task_id} are not a list")
        return drafts

    def tasks(self, project_id: int, page_size: int = 100) -> Iterator[dict]:
        """The project's tasks with their annotations and predictions, page by page."""
        page, seen = 1, 0
        while True:
            answer = self._call(
                "GET", f"/api/tasks?project={int(project_id)}&fields=all&page={page}&page_size={page_size}"
            )
            tasks = answer.get("tasks", []) if isinstance(answer, dict) else []
            yield from tasks
            seen += len(tasks)
            if not tasks or seen >= int(answer.get("total", 0)):
                return
            page += 1

    def create_prediction(self, task_id, prediction: dict) -> dict:
        body = {"task": task_id_for_presign(task_id), **prediction}
        return self._call("POST", "/api/predictions", json=body)
