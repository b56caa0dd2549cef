"""PaDT in the browser: upload an image, choose a task preset or type a prompt, see the completion, boxes, masks and
VRT cells. Needs the `demo` extra (pip install -e .[demo]).

    python eval/gradio_app.py --model PaDT-MLLM/PaDT_Pro_3B            # http://127.0.0.1:7860
    python eval/gradio_app.py                                          # the shipped tiny shapes model

Binds 127.0.0.1 (this machine only). To serve other machines, pass --host 0.0.0.0 knowingly: there is no login.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "padt" / "assets" / "tiny_default"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the shipped tiny model)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    args = ap.parse_args(argv)
    from padt.inference.predictor import cli_generation_error

    error = cli_generation_error(args.max_new_tokens, args.device)
    if error:
        print(error, file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("the demo needs gradio: pip install -e .[demo]", file=sys.stderr)
        return 2
    from padt.inference.demo import DemoApp, launch

    model = args.model or DEFAULT_MODEL
    try:
        app = DemoApp.from_pretrained(model, device=args.device, max_new_tokens=args.max_new_tokens)
    except OSError as err:
        print(f"cannot load model {model}: {err}", file=sys.stderr)
        return 2
    launch(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
