"""smi-hub Gradio demo: nearest gallery images and localization maps of a query image.

Start it with ``smi-hub demo [--model NAME_OR_PATH ...] [--allow-any-model] [--gallery DIR]
[--port N] [--host H] [--max-pixels N]`` or ``python demo/app.py [...]``. It binds 127.0.0.1 by
default, sends no analytics and uses no network: the default model is the embedded
``smi_resnet18_fmnist`` and the default gallery is built from the installed Fashion-MNIST test
split (``smi_hub.default_gallery()``). Visitors can load only the models the page offers (the
available registry models and every ``--model``) unless ``--allow-any-model`` is given.

The work is done by ``SearchEngine`` in ``demo/engine.py`` (no Gradio in it, unit-tested
directly; loaded as :data:`core`); :func:`build_app` wires it to the page and :func:`main` parses
the command line and launches the server.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported

import argparse
import contextlib
import socket
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from smi_hub.registry import DEFAULT_MODEL
from smi_hub.script_modules import load_demo_module

HERE = Path(__file__).parent  # demo/ is no package: its files load each other by path
core = load_demo_module("engine", HERE)  # the model, gallery index, searches and maps
display = load_demo_module("display", HERE)  # what the page shows of them (MAP_TYPES)

SEARCH_CONCURRENCY = 4  # searches served at once: one slow query does not hold up the others
MAX_UPLOAD = "50mb"
MAX_K = 20
_GRADIO_MAJOR = int(gr.__version__.split(".")[0])
# tiny images: show the pixels (no smoothing) and let the query fill its box
CSS = """
#query img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#query-map img, #neighbours img { image-rendering: pixelated; }
"""

# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------


def _upload_folder() -> Path:
    """Where Gradio keeps uploaded files (the only files a query may name)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def lenient_preprocess(component: gr.Image) -> gr.Image:
    """Let uploads PIL cannot open reach the search (as their file path), so the search says
    clearly what is wrong instead of Gradio's generic error. Same front end as ``gr.Image``.
    Images sent inline as ``data:`` URLs are refused: Gradio would decode them whole before
    the engine could check their size."""
    strict = component.preprocess

    def preprocess(payload: Any) -> Any:
        if str(getattr(payload, "url", None) or "").startswith("data:"):
            raise gr.Error("Upload the image as a file; inline data: URLs are not accepted.")
        path = getattr(payload, "path", None)
        if path and not Path(path).resolve().is_relative_to(_upload_folder()):
            raise gr.Error("Upload the image as a file; paths on the server are not accepted.")
        try:
            return strict(payload)
        except Exception:
            path = getattr(payload, "path", None)
            return str(path) if path else None

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def _hidden_api() -> dict[str, Any]:
    return {"api_visibility": "private"} if _GRADIO_MAJOR >= 6 else {"show_api": False}


def _warn(message: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # outside a request gr.Warning only warns
        gr.Warning(message)


def search_page(
    engine: core.SearchEngine,
    image: Any,
    k: int = 5,
    map_type: str = "similarity",
    alpha: float = 0.4,
) -> tuple[list[tuple[Image.Image, str]], Image.Image | None, str]:
    """The ``/search`` handler: ``engine.run`` with every problem turned into a message (a
    warning toast and the status line), never an exception."""
    if image is None:
        return [], None, "Upload an image or pick an example."
    try:
        return engine.run(image, int(k), map_type, float(alpha))
    except core.DemoError as e:
        _warn(str(e))
        return [], None, f"**{e}**"
    except Exception as e:  # never let one request take the page down
        traceback.print_exc()
        msg = f"Unexpected error ({type(e).__name__}: {e}). Details in the server log."
        _warn(msg)
        return [], None, f"**{msg}**"


def load_model_page(engine: core.SearchEngine, name: str | None, folder: str | None) -> str:
    """The ``/load_model`` handler: a weights folder (if given) or a registry name; returns the
    status Markdown, with the reason when the model could not be loaded (the previous one
    stays)."""
    target = (folder or "").strip() or (name or "").strip()
    if not target:
        msg = "Pick a registered model or type the path of a weights folder."
        _warn(msg)
        return engine.status_markdown() + f"  \n**{msg}**"
    if not engine.may_load(target):  # the same answer whatever the value points to
        shown = target if len(target) <= 60 else target[:57] + "..."
        msg = (
            f"This demo does not offer the model {shown!r}. Pick one of the listed models "
            "(the operator offers more with `smi-hub demo --model NAME_OR_FOLDER`)."
        )
        _warn(msg)
        return engine.status_markdown() + f"  \n**{msg}**"
    try:
        return engine.set_model(target)
    except core.DemoError as e:
        _warn(str(e))
        return engine.status_markdown() + f"  \n**{e}**"
    except Exception as e:
        traceback.print_exc()
        msg = f"Unexpected error while loading {target!r}: {type(e).__name__}: {e}"
        _warn(msg)
        return engine.status_markdown() + f"  \n**{msg}**"


def build_app(
    model: Any = None,
    gallery: str | os.PathLike | None = None,
    *,
    engine: core.SearchEngine | None = None,
    k: int = 5,
    cache_root: str | os.PathLike | None = None,
    progress: bool = True,
    models: Sequence[str | os.PathLike] = (),
    allow_any_model: bool = False,
    max_pixels: int = core.MAX_PIXELS,
    index: str | os.PathLike | None = None,
) -> gr.Blocks:
    """The demo page for ``model`` (name, path or ``SMIModel``; None: the embedded default) and
    ``gallery`` (folder; None: the default Fashion-MNIST gallery). The page can switch to the
    registry models available here, ``model`` and ``models``; to anything ``smi_hub.load``
    takes only with ``allow_any_model`` (see ``SearchEngine`` in ``demo/engine.py``).

    Named API endpoints: ``/search`` (image, k, map type, opacity -> neighbours, query map,
    status) and ``/load_model`` (registry name, folder -> status). The engine is available as
    ``app.smi_engine``.
    """
    if engine is None:
        engine = core.SearchEngine(
            model,
            gallery,
            cache_root=cache_root,
            progress=progress,
            models=models,
            allow_any_model=allow_any_model,
            max_pixels=max_pixels,
            index=index,
        )

    def run_search(image: Any, k: int, map_type: str, alpha: float) -> tuple[Any, Any, str]:
        return search_page(engine, image, k, map_type, alpha)

    def load_model(name: str | None, folder: str | None, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        return load_model_page(engine, name, folder)

    choices = engine.offered
    current = engine.model_name if engine.model_name in choices else None
    style = {"css": CSS} if _GRADIO_MAJOR < 6 else {}  # Gradio 6: launch(css=...)
    with gr.Blocks(title="smi-hub demo", analytics_enabled=False, **style) as app:
        gr.Markdown(
            "# smi-hub: nearest neighbours and localization maps\n"
            "Upload an image (or pick an example from the gallery): the page shows the most "
            "similar gallery images (cosine similarity of pooled SMI backbone features) and "
            "where the model responds, as a heat map over the image."
        )
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Image(
                    label="Query image",
                    type="filepath",
                    image_mode=None,  # no decoding by Gradio: the engine checks the size first
                    sources=["upload", "clipboard"],
                    height=280,
                    format="png",
                    elem_id="query",
                )
                lenient_preprocess(query)
                k_slider = gr.Slider(1, MAX_K, value=k, step=1, label="k (neighbours)")
                map_type = gr.Radio(
                    [(label, method) for label, method in display.MAP_TYPES.items()],
                    value="similarity",
                    label="Map type",
                )
                alpha = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Map opacity")
                button = gr.Button("Search", variant="primary", elem_id="search")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image or pick an example.", elem_id="status")
                with gr.Row():
                    qmap = gr.Image(
                        label="Query localization map",
                        format="png",
                        interactive=False,
                        height=260,
                        elem_id="query-map",
                    )
                neighbours = gr.Gallery(
                    label="Most similar gallery images (rank. class · cosine similarity)",
                    columns=5,
                    height="auto",
                    object_fit="contain",
                    format="png",
                    elem_id="neighbours",
                )
        examples = core.example_images(engine)
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=[query], label="Gallery examples")
        with gr.Accordion("Model and gallery", open=engine.model is None):
            with gr.Row():
                model_dd = gr.Dropdown(
                    choices=choices,
                    value=current,
                    label="Model (offered by this demo)",
                    allow_custom_value=True,
                )
                model_path = gr.Textbox(
                    label="...or any weights folder, Hugging Face repo id or URL",
                    value="" if current else (engine.model_name if engine.model else ""),
                    placeholder="weights/my_model",
                    visible=engine.allow_any_model,
                )
                load_btn = gr.Button("Load model")
            info = gr.Markdown(engine.status_markdown(), elem_id="model-status")

        inputs = [query, k_slider, map_type, alpha]
        outputs = [neighbours, qmap, status]
        many = {"concurrency_limit": SEARCH_CONCURRENCY}
        button.click(run_search, inputs, outputs, api_name="search", **many)
        query.change(run_search, inputs, outputs, **_hidden_api(), **many)
        for control in (k_slider, alpha):
            control.release(run_search, inputs, outputs, **_hidden_api(), **many)
        map_type.change(run_search, inputs, outputs, **_hidden_api(), **many)
        load_btn.click(load_model, [model_dd, model_path], [info], api_name="load_model")
    app.smi_engine = engine  # type: ignore[attr-defined]
    return app


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> Any:
    """Start the server on ``host:port`` (local only, no share link, no analytics)."""
    engine: core.SearchEngine | None = getattr(app, "smi_engine", None)
    # only the gallery images the page shows by path (its examples), never the folder: other
    # files beside them, hidden folders and the cache stay private (#18 item 9)
    allowed = core.example_images(engine) if engine is not None else []
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=True,
        allowed_paths=allowed,
        max_file_size=MAX_UPLOAD,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        ssr_mode=False,
        **({"css": CSS} if _GRADIO_MAJOR >= 6 else {}),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smi-hub demo", description="Gradio demo: nearest neighbours and localization maps."
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="registry name, weights folder, Hugging Face repo id or URL; repeat to offer "
        f"several on the page, the first is loaded (default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--allow-any-model",
        action="store_true",
        help="let visitors load any folder, repo id or URL on this machine (off by default)",
    )
    p.add_argument(
        "--gallery", default=None, help="folder of images (default: Fashion-MNIST test images)"
    )
    p.add_argument(
        "--index", default=None, help="index folder (smi-hub index) to search, not re-extracted"
    )
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=core.MAX_PIXELS,
        help=f"query images with more pixels are refused (default {core.MAX_PIXELS:,})",
    )
    return p


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (None if it can)."""
    if not 0 <= port <= 65535:
        return f"--port {port} is not a port number (1 to 65535)."
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        return (
            f"cannot listen on {host}:{port or ''} ({e.strerror or e}): the port is in use or the "
            "address is not one of this machine's; pick another --port (or leave it out to "
            "take the next free one) or --host."
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and serve the demo until interrupted."""
    args = build_parser().parse_args(argv)
    if problem := port_problem(args.host, args.port or 0):  # 0: is the address ours?
        print(f"smi-hub demo: error: {problem}", file=sys.stderr)
        return 2
    if args.max_pixels < 1:
        print(
            f"smi-hub demo: error: --max-pixels must be >= 1, got {args.max_pixels}.",
            file=sys.stderr,
        )
        return 2
    if args.index and args.gallery:
        print("smi-hub demo: error: give --index or --gallery, not both.", file=sys.stderr)
        return 2
    models = args.model or []
    app = build_app(
        model=models[0] if models else None,
        gallery=args.gallery,
        models=models[1:],
        allow_any_model=args.allow_any_model,
        max_pixels=args.max_pixels,
        index=args.index,
    )
    engine: core.SearchEngine = app.smi_engine  # type: ignore[attr-defined]
    for problem in (engine.model_error, engine.gallery_error):
        if problem:
            print(f"smi-hub demo: {problem}", file=sys.stderr)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            launch(app, host=args.host, port=args.port)
    except OSError as e:  # e.g. no free port from 7860 on
        print(f"smi-hub demo: error: could not start the server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
