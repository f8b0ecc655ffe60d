"""The page at /ui (`omni-fast serve --ui`): drop a clip, watch the reasoning stream, read the emotion.

Built with Gradio (the `ui` extra) and mounted on the server's own FastAPI app. The page is a client of the
server's API (omni_fast.serve.page): each Recognize sends one streamed POST /v1/chat/completions to the server's
own address, so it goes through the same limits, queue, metrics and engine loop as every API client, and shares
the engine's batch and caches with them. Its fields: a video (dropped, uploaded or one of the sample clips), an
optional separate audio file, the modality, the question (R1-Omni's by default), the sampling settings (greedy
by default, temperature, n, max tokens, seed) and the label set the emotion is placed in. It shows the response
as it is generated, then the emotion apart (with the n answers' agreement when n > 1), the timings, and any
refusal or failure as one line.

With --api_key the page is behind a login form (Gradio's, whose cookie every page route checks: the page, its
config, uploads and its queue): the password is the API key, the user name is not checked. The page's own API
requests carry the key.
"""
from __future__ import annotations

import hmac
import html
import logging
from dataclasses import dataclass
from pathlib import Path

from omni_fast.serve.loop import one_line
from omni_fast.serve.page import (MODALITIES, Answer, PageError, agreement, agreement_line, answers_table,
                                  label_note, page_request, stream_answer, timings_line)
from omni_fast.serve.state import ServerState
from omni_fast.task import DEFAULT_INSTRUCT, LABEL_SETS

log = logging.getLogger(__name__)
PATH = "/ui"
MAX_N = 8  # the page's largest n (the server's --max_num_seqs caps it further)
DELETE_UPLOADS = (3600, 3600)  # every hour, uploads older than an hour are deleted
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page loads nothing from outside
MONO_FONTS = ["ui-monospace", "monospace"]
CSS = "#error p { color: #b91c1c; font-weight: 600; margin: 0; } #label-note p, #timings p { margin: 0; }"


@dataclass(slots=True)
class Sample:
    name: str  # what the page calls it
    video: str  # the clip
    audio: str | None = None  # a separate audio file, if the sample has one


def _check_key(key: str):
    def check(username: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), key.encode())

    return check


def build_page(state: ServerState, samples: list[Sample]):
    """The Gradio Blocks of the page, its Recognize event bound to the server's API."""
    import gradio as gr

    config = state.config
    max_n = max(1, min(MAX_N, config.max_num_seqs))
    with gr.Blocks(title=f"omni-fast · {config.served_model_name}", analytics_enabled=False,
                   delete_cache=DELETE_UPLOADS) as page:
        gr.Markdown(f"## omni-fast · `{config.served_model_name}`\nDrop a clip, ask the question, watch the reasoning "
                    "stream and the emotion appear. The page sends the same requests as any client of "
                    "`/v1/chat/completions`.")
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.Video(label="Video (drop a clip)", sources=["upload"], elem_id="video")
                audio = gr.Audio(label="Separate audio (optional)", type="filepath", sources=["upload"],
                                 elem_id="audio")
                if samples:
                    gr.Examples([[s.video, s.audio] for s in samples], inputs=[video, audio], label="Sample clips",
                                example_labels=[s.name for s in samples], elem_id="samples")
                modality = gr.Radio(list(MODALITIES), value="video + audio", label="Modality", elem_id="modality")
                question = gr.Textbox(DEFAULT_INSTRUCT, label="Question", lines=3, elem_id="question")
                with gr.Row():
                    run = gr.Button("Recognize", variant="primary", elem_id="run")
                    stop = gr.Button("Stop", elem_id="stop")
                with gr.Accordion("Sampling", open=False, elem_id="sampling"):
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)",
                                            elem_id="temperature")
                    n = gr.Slider(1, max_n, value=1, step=1, label="n (answers)", elem_id="n")
                    max_tokens = gr.Number(state.defaults.max_tokens, precision=0, minimum=1,
                                           label="Max tokens", elem_id="max-tokens")
                    seed = gr.Number(-1, precision=0, minimum=-1, label="Seed (-1: random)", elem_id="seed")
                label_set = gr.Dropdown(list(LABEL_SETS), value="mafw", label="Label set", elem_id="label-set")
            with gr.Column(scale=1):
                error = gr.HTML(visible=False, elem_id="error")
                text = gr.Textbox(label="Reasoning (streamed as it is generated)", lines=10, max_lines=30,
                                  interactive=False, elem_id="reasoning")
                emotion = gr.Label(label="Emotion", elem_id="emotion")
                note = gr.HTML(elem_id="label-note")
                answers = gr.Dataframe(headers=["#", "emotion", "finish", "reasoning"], label="The n answers",
                                       visible=False, interactive=False, wrap=True, elem_id="answers")
                timings = gr.HTML(elem_id="timings")

        named = dict(error=error, text=text, emotion=emotion, note=note, answers=answers, timings=timings)

        async def recognize(video, audio, modality, question, temperature, n, max_tokens, seed, label_set):
            yield {named[k]: v for k, v in _cleared(gr).items()}
            try:
                request = page_request(video, audio, modality, question, temperature, int(n), max_tokens,
                                       seed, config.served_model_name)
                if state.url is None:
                    raise PageError("Error: the server is not listening yet")
                async for answer in stream_answer(state.url, config.api_key, request,
                                                  config.request_timeout + 30):
                    yield {named[k]: v for k, v in _shown(gr, answer, label_set).items()}
            except PageError as e:
                yield {error: gr.HTML(_html(e.line), visible=True)}
            except Exception as e:  # noqa: BLE001 - a fault of the page itself: one line there, the trace in the log
                log.exception("the page's request failed")
                yield {error: gr.HTML(_html(f"Error: {one_line(e)}"), visible=True)}

        event = run.click(recognize, [video, audio, modality, question, temperature, n, max_tokens, seed, label_set],
                          list(named.values()), concurrency_limit=None, show_progress="minimal")
        stop.click(None, cancels=[event])
    page.queue(default_concurrency_limit=None)
    return page


def _html(line: str) -> str:
    """A line of text as the page's HTML shows it: escaped (a message may hold <answer> or a file name)."""
    return f"<p>{html.escape(line)}</p>" if line else ""


def _cleared(gr) -> dict:
    return {"error": gr.HTML("", visible=False), "text": "", "emotion": None, "note": "",
            "answers": gr.Dataframe(value=None, visible=False), "timings": ""}


def _shown(gr, answer: Answer, label_set: str) -> dict:
    """An answer so far -> the outputs' new values (the text of choice 1 streams; the rest once it is done)."""
    shown = {"text": answer.texts[0]}
    if answer.done:
        n = len(answer.texts)
        shown["emotion"] = agreement(answer.emotions)
        note = label_note(answer.emotions, label_set)
        shown["note"] = _html(note if n == 1 else f"{agreement_line(answer.emotions)} {note}")
        shown["answers"] = gr.Dataframe(value=answers_table(answer), visible=n > 1)
        shown["timings"] = _html(timings_line(answer))
    return shown


def mount_page(app, state: ServerState, samples: list[Sample]) -> None:
    """Mount the page at /ui on the server's FastAPI app (behind the API key's login when --api_key is set)."""
    import gradio as gr

    page = build_page(state, samples)
    key = state.config.api_key
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
    sample_dirs = sorted({str(Path(p).parent) for s in samples for p in (s.video, s.audio) if p})
    # root_path: the URLs of the files the page shows (a picked sample) keep the /ui prefix
    gr.mount_gradio_app(app, page, path=PATH, root_path=PATH, auth=_check_key(key) if key else None,
                        auth_message="Sign in with this server's API key as the password (any user name).",
                        footer_links=[], run_history=False, pwa=False, ssr_mode=False, mcp_server=False,
                        show_error=False, max_file_size=state.config.max_request_bytes, theme=theme, css=CSS,
                        allowed_paths=sample_dirs)
