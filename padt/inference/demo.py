"""Gradio demo: upload an image, pick a task preset (or type a prompt), see the completion, boxes, masks and VRT cells.

    python eval/gradio_app.py --model PaDT-MLLM/PaDT_Pro_3B          # http://127.0.0.1:7860 (local only)

`DemoApp.predict(image, task, query, prompt)` is the whole prediction path (usable without a browser); `build_demo`
wraps it in a `gradio.Blocks`; `launch` binds 127.0.0.1 unless told otherwise. Gradio is the optional extra
``padt[demo]`` and is imported only by `build_demo` / `launch`.
"""

from __future__ import annotations

import os

from PIL import Image

from padt.preprocess.templates import RIC_PROMPT, ovd_prompt, rec_prompt

TASK_PRESETS = {
    "REC: find the object a sentence describes": "rec",
    "OVD: detect categories (comma-separated)": "ovd",
    "RIC: describe the image, grounding its objects": "ric",
    "Custom prompt": "custom",
}
DEFAULT_HOST = "127.0.0.1"


def build_prompt(task: str, query: str | None = None, prompt: str | None = None) -> str:
    """The prompt of a task preset: "rec" + sentence, "ovd" + comma-separated categories, "ric", or "custom" +
    prompt. A non-empty `prompt` always wins. Accepts the preset labels of `TASK_PRESETS` too."""
    if prompt and prompt.strip():
        return prompt.strip()
    kind = TASK_PRESETS.get(task, task)
    query = (query or "").strip()
    if kind == "ric":
        return RIC_PROMPT
    if kind == "rec":
        if not query:
            raise ValueError("REC needs a sentence describing the object (the query box)")
        return rec_prompt(query)
    if kind == "ovd":
        names = [c.strip() for c in query.split(",") if c.strip()]
        if not names:
            raise ValueError("OVD needs at least one category name (comma-separated, e.g. 'cat, dog')")
        return ovd_prompt(names)
    if kind == "custom":
        raise ValueError("the custom task needs a prompt")
    raise ValueError(f"unknown task {task!r}; choose one of {sorted(set(TASK_PRESETS.values()))}")


class DemoApp:
    """Prediction and drawings for one image + prompt, over a `PaDTPredictor` (or any object with its `predict`)."""

    def __init__(self, predictor, cell_size_px: int | None = None, spatial_merge_size: int | None = None):
        self.predictor = predictor
        config = getattr(getattr(predictor, "model", None), "config", None)
        self.cell_size_px = cell_size_px or getattr(config, "cell_size_px", None)
        self.spatial_merge_size = spatial_merge_size or getattr(config, "spatial_merge_size", None)
        if self.cell_size_px is None or self.spatial_merge_size is None:
            raise ValueError("pass cell_size_px and spatial_merge_size (the predictor has no model config)")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | None = None, max_new_tokens: int = 512) -> DemoApp:
        """A `DemoApp` over `PaDTPredictor.from_pretrained`; `ValueError` for an unusable device (cuda without CUDA)
        or ``max_new_tokens < 1``."""
        from padt.inference.predictor import PaDTPredictor, check_device

        check_device(device)  # a clear ValueError for cuda on a CPU-only build, before loading anything
        return cls(PaDTPredictor.from_pretrained(path, device=device, max_new_tokens=max_new_tokens))

    def predict(self, image: Image.Image | str | os.PathLike | None, task: str, query: str | None = None,
                prompt: str | None = None) -> tuple[str, Image.Image, Image.Image, Image.Image]:
        """Returns (completion text, boxes drawn on the image, masks, VRT cells over the image), all at the image's
        size. Raises ValueError for a missing image or an incomplete task preset. Typed text (query, prompt) is plain
        text: the predictor escapes special-token strings in it (`PaDTPredictor.predict`)."""
        from padt.inference.visualization import draw_boxes, draw_masks, draw_vrt_cells
        from padt.processing.qwen import load_image

        if image is None:
            raise ValueError("upload an image first")
        image = load_image(image)
        text = build_prompt(task, query, prompt)
        [pred] = self.predictor.predict([image], [text])
        return (pred.text, draw_boxes(image, pred), draw_masks(image, pred),
                draw_vrt_cells(image, pred, self.cell_size_px, self.spatial_merge_size))


def build_demo(app: DemoApp, title: str = "PaDT: Patch-as-Decodable-Token"):
    """A `gradio.Blocks` with image upload, task preset, query, prompt, and the four outputs."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def run(image, task, query, prompt):
        try:
            return app.predict(image, task, query, prompt)
        except ValueError as err:
            raise gr.Error(str(err)) from err

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nUpload an image, choose a task (or type a full prompt), and run.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image")
                task = gr.Dropdown(list(TASK_PRESETS), value=next(iter(TASK_PRESETS)), label="task")
                query = gr.Textbox(label="query (REC: a sentence; OVD: categories, comma-separated)",
                                   value="the car on the left")
                prompt = gr.Textbox(label="prompt (optional; overrides the task preset)")
                button = gr.Button("Run", variant="primary")
            with gr.Column():
                completion = gr.Textbox(label="completion", lines=4)
                boxes = gr.Image(type="pil", label="boxes")
                masks = gr.Image(type="pil", label="masks")
                cells = gr.Image(type="pil", label="VRT cells")
        button.click(run, [image, task, query, prompt], [completion, boxes, masks, cells], api_name="predict")
    return demo


def launch(app: DemoApp, host: str = DEFAULT_HOST, port: int | None = None, block: bool = True, **kwargs):
    """Serve the demo on host:port (127.0.0.1 by default: reachable from this machine only; never a share link).

    With ``block=False`` it returns at once: the returned `gradio.Blocks` has ``local_url``, and ``close()`` stops
    the server. `kwargs` go to `gradio.Blocks.launch` (e.g. ``quiet=True``)."""
    demo = build_demo(app)
    demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, **kwargs)
    return demo
