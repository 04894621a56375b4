# Request side of `tinygptv serve`: an OpenAI chat.completions body -> a checked ChatRequest (turns, at most one image,
# generation settings) -> the model's prompt. Data path: HTTP JSON -> [here] -> prompt + image -> worker -> generate.
# Every check fails with a 400 naming the field; nothing here decodes an image or tokenizes (openai_api does both, in a
# worker thread, under the model's limits).
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from tinygptv.data.image_file import DEFAULT_MAX_PIXELS, EncodedImage
from tinygptv.data.templates import IMAGE_PLACEHOLDER, TEMPLATES, Conversation, with_task
from tinygptv.model.generation import utf8_problem

# How a request's system message is written in each template; a template not listed takes the text as it is (as the
# official stage-3 demo writes its system line). The text replaces the template's own system line.
SYSTEM_FORMATS = {"chatml": "<|im_start|>system\n{}<|im_end|>\n"}
MAX_STOPS = 4  # OpenAI's limit
# transformers prepares every stop string against the whole vocabulary before generating (about 1.3 s for a
# 1000-character one with a 49k vocabulary), on the thread every request waits for
MAX_STOP_CHARS = 200
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


class APIError(Exception):
    """An error the client caused (or an overloaded server), sent back in OpenAI's error shape so that its clients
    raise the matching exception (BadRequestError, AuthenticationError, NotFoundError...)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is a `tinygptv serve` flag."""

    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_tokens: int = 1024  # a larger max_tokens is refused (400), not clamped, so the client knows
    default_max_tokens: int = 300  # when the request leaves max_tokens out
    allow_local_files: Path | None = None  # file:// image URLs are refused unless this folder is set
    # prompt tokens (BOS + text + image queries); None: what the model's context leaves after max_tokens
    max_prompt_tokens: int | None = None


@dataclass
class ChatRequest:
    model: str | None
    turns: list[tuple[str, str | None]]  # (user text, assistant answer); the last answer is None
    system: str | None = None
    image: EncodedImage | Path | None = None  # the image file, not decoded yet
    image_param: str | None = None  # the request field that carried it, for errors
    image_turn: int | None = None  # index of the turn whose message carried the image
    max_tokens: int = 300
    temperature: float | None = None  # None: the server's default; 0: greedy
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None


def parse_json(raw: bytes) -> Any:
    """The request body as JSON. Python's parser takes more than JSON allows, and some of it is trouble here: NaN and
    Infinity literals, numbers that overflow to infinity (1e999), integers of thousands of digits; nesting deep enough
    to exhaust the parser's recursion is refused too (400 rather than a server error)."""
    try:
        return json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # _not_json, _finite, or an integer past Python's digit limit
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Check every field the server uses and fail on the first problem, naming the field (`param`) as OpenAI does.
    Fields OpenAI defines that do not change a greedy or sampled answer here (user, presence_penalty...) are ignored."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", param="model")
    n = _integer(body, "n", 1, None)
    if n not in (None, 1):
        raise APIError(400, f"n={n}: this server returns one choice per request; send n=1 or leave it out", param="n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise APIError(400, f"{name} are not supported by this model", param=name)
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
    request = ChatRequest(model=model, turns=[])
    _read_messages(body.get("messages"), request, limits)
    request.max_tokens = _max_tokens(body, limits)
    request.temperature = _number(body, "temperature", 0.0, 2.0)
    request.top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    request.stop = _stops(body.get("stop"))
    request.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        request.include_usage = _boolean(options, "include_usage", "stream_options.include_usage")
    request.seed = _integer(body, "seed", *SEED_RANGE)
    return request


def build_prompt(request: ChatRequest, template: str, end_sym: str, task: str | None = None) -> str:
    """The whole conversation in the model's template, built by the same Conversation class `tinygptv chat` uses, so
    a request with the same turns gets the same prompt as a chat session. The image sits at the turn that sent it."""
    form = TEMPLATES[template]
    if request.system is not None:
        form = replace(form, system=SYSTEM_FORMATS.get(template, "{}").format(request.system))
    conversation = Conversation(form, end_sym=end_sym)
    for i, (user, answer) in enumerate(request.turns):
        conversation.add_user(with_task(user, task), with_image=i == request.image_turn)
        if answer is not None:
            conversation.add_answer(answer)
    return conversation.prompt()


# --- messages ---------------------------------------------------------------------------------------------------------

def _read_messages(messages: Any, request: ChatRequest, limits: Limits) -> None:
    """System messages first, then user/assistant turns ending with a user message. Consecutive messages of one role
    are joined with a newline (the template has one slot per turn)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    system: list[str] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{param} must be an object", param=param)
        role = message.get("role")
        text, image = _content(message.get("content"), f"{param}.content", limits, images_allowed=role == "user")
        if role in ("system", "developer"):
            if request.turns:
                raise APIError(400, f"{param}: a {role} message must come before the conversation", param=param)
            system.append(text)
        elif role == "user":
            if request.turns and request.turns[-1][1] is None:
                request.turns[-1] = (request.turns[-1][0] + "\n" + text, None)
            else:
                request.turns.append((text, None))
            if image is not None:
                if request.image is not None:
                    raise APIError(400, f"{param}: the model takes one image per conversation; this is the second",
                                   param=f"{param}.content", code="too_many_images")
                request.image, request.image_param = image
                request.image_turn = len(request.turns) - 1
        elif role == "assistant":
            if not request.turns:
                raise APIError(400, f"{param}: an assistant message must follow a user message", param=param)
            user, answer = request.turns[-1]
            request.turns[-1] = (user, text if answer is None else answer + "\n" + text)
        else:
            raise APIError(400, f"{param}: role {_shown(role)} is not supported; use system, user or assistant",
                           param=f"{param}.role")
    if not request.turns or request.turns[-1][1] is not None:
        raise APIError(400, "the last message must be a user message (the one to answer)", param="messages")
    request.system = "\n".join(system) if system else None


def _content(content: Any, param: str, limits: Limits,
             images_allowed: bool) -> tuple[str, tuple[EncodedImage | Path, str] | None]:
    if isinstance(content, str):
        return _text(content, param), None
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of content parts", param=param)
    texts, image = [], None
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.text must be a string", param=f"{where}.text")
            texts.append(_text(part["text"], f"{where}.text"))
        elif kind == "image_url":
            if not images_allowed:
                raise APIError(400, f"{where}: only user messages may carry an image", param=where)
            if image is not None:
                raise APIError(400, f"{where}: the model takes one image per conversation; this is the second",
                               param=where, code="too_many_images")
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise APIError(400, f"{where}.image_url.url must be a string", param=f"{where}.image_url.url")
            image = load_image_url(url, f"{where}.image_url.url", limits), f"{where}.image_url.url"
        else:
            raise APIError(400, f"{where}: content part type {_shown(kind)} is not supported; use text or image_url",
                           param=f"{where}.type")
    return "\n".join(texts), image


def _text(text: str, param: str) -> str:
    """The placeholder is where the model splices image embeddings; typed by a client it would be a second image.
    JSON can carry lone surrogates (\\udcff), which no tokenizer takes."""
    problem = utf8_problem(text)
    if problem:
        raise APIError(400, f"{param}: the text is not valid Unicode ({problem})", param=param)
    if IMAGE_PLACEHOLDER in text:
        raise APIError(400, f"{param}: the text must not contain {IMAGE_PLACEHOLDER}; send the image as an image_url "
                            "part", param=param)
    return text


# --- images -----------------------------------------------------------------------------------------------------------

def load_image_url(url: str, param: str, limits: Limits) -> EncodedImage | Path:
    """A data: URL (base64 image) or, when the server allows a folder, a file:// URL inside it, as the image file to
    decode. The server never fetches http(s) URLs: that would let any client make it reach other machines."""
    if url.startswith("data:"):
        header, comma, data = url[len("data:"):].partition(",")
        if not comma or not header.endswith(";base64") or not header.startswith("image/"):
            raise APIError(400, f"{param}: a data URL must look like data:image/png;base64,<data>", param=param,
                           code="invalid_image_url")
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the data URL's base64 data is malformed", param=param,
                           code="invalid_image_url") from None
        return EncodedImage(param, raw)
    if url.startswith("file:"):
        return _local_file(url, param, limits)
    raise APIError(400, f"{param}: only data: URLs (base64 images) are accepted; this server does not download "
                        "images", param=param, code="invalid_image_url")


def _local_file(url: str, param: str, limits: Limits) -> Path:
    if limits.allow_local_files is None:
        raise APIError(400, f"{param}: file:// URLs are refused; start the server with --allow-local-files DIR to "
                            "read images from DIR, or send the image as a data URL", param=param,
                       code="local_files_not_allowed")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{param}: a file URL must name a file on this machine", param=param)
    path = Path(url2pathname(parsed.path)).resolve()
    if not path.is_relative_to(limits.allow_local_files.resolve()):
        raise APIError(400, f"{param}: the file is outside the folder allowed by --allow-local-files", param=param,
                       code="local_files_not_allowed")
    if not path.is_file():
        raise APIError(400, f"{param}: no such file in the allowed folder", param=param)
    return path


# --- scalar fields ----------------------------------------------------------------------------------------------------

def _max_tokens(body: dict, limits: Limits) -> int:
    value = _integer(body, "max_tokens", 1, None)
    newer = _integer(body, "max_completion_tokens", 1, None)
    if value is not None and newer is not None and value != newer:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one of them", param="max_tokens")
    value = newer if newer is not None else value
    name = "max_completion_tokens" if newer is not None else "max_tokens"
    if value is None:
        return min(limits.default_max_tokens, limits.max_tokens)
    if value > limits.max_tokens:
        raise APIError(400, f"{name}={value} is above this server's limit of {limits.max_tokens} (--max-tokens-limit)",
                       param=name)
    return value


def _stops(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed", param="stop")
    if any(not s.strip() for s in stops):
        raise APIError(400, "stop strings made only of whitespace are not supported (generation ignores them)",
                       param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    for s in stops:
        _text(s, "stop")
    return stops


def _integer(body: dict, name: str, low: int | None, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {_shown(value)}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"{name}={value} is out of range", param=name)
    return value


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise APIError(400, f"{name} must be a finite number, got {_shown(value)}", param=name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{name}={value} is out of range {interval}", param=name)
    return float(value)


def _boolean(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{param or name} must be true or false", param=param or name)
    return value


def _shown(value: Any, limit: int = 60) -> str:
    """A client's value as an error message quotes it: never the whole of a megabyte-long string or list."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
