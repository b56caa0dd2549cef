"""PaDT vs vanilla Qwen2.5-VL inference cost, measured side by side (bench/README.md).

Workload (the authors' anchors, bench/workload/README.md): the bench config with random weights from a fixed seed,
vanilla Qwen2.5-VL with the *same* base weights (state dict copied from the PaDT model), a 448x448 image (256 VRT
prototypes), a REC prompt of 304 tokens, greedy decoding of exactly 32 new tokens, batch 1, fp32, sdpa, 2 threads.

Measured, padt / vanilla: prefill time, decode time per token, bytes requested from the allocator per decode token
(torch profiler), and peak RSS of each variant in its own fresh process. Timings interleave the two models in one
process in rotating order after a warm-up, under jemalloc (the script re-execs itself with it when installed), and
report medians of paired ratios with 25th/75th percentiles. Before timing, it checks that both run the same LLM: the
PaDT model's text-token logits equal vanilla's (prototype columns left out).

    python bench/bench_inference.py --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

VARIANTS = ("padt", "vanilla")
# (metric key, label, authors' ratio, target ratio); the last three are diagnostics (deterministic, load-independent)
METRICS = (
    ("prefill_s", "prefill", 1.01, 1.02),
    ("decode_s", "decode / token", 1.12, 1.03),
    ("decode_bytes", "allocator bytes / decode token", 5.56, 1.2),
    ("peak_rss", "peak RSS (fresh process)", 1.59, None),
    ("decode_allocs", "allocations / decode token", None, None),
    ("decode_ops", "profiled aten ops / decode token", None, None),
    ("prefill_ops", "profiled aten ops, prefill", None, None),
)
TIMED = ("prefill_s", "decode_s")
MIN_CLEAN_ROUNDS = 10  # fewer accepted rounds than this: report all rounds, with a warning
PROFILED = ("decode_bytes", "decode_allocs", "decode_ops", "prefill_ops")
REC_PROMPT = 'Please carefully check the image and detect the object this sentence describes: "{}".'
FILLER_WORDS = (  # words appended one by one to the referring expression until the prompt has --prompt-tokens
    "the", "tall", "man", "in", "a", "dark", "blue", "coat", "standing", "next", "to", "the", "red", "car", "on",
    "the", "left", "side", "of", "the", "street", "near", "a", "small", "tree", "holding", "an", "open",
    "umbrella", "while", "looking", "at", "his", "phone", "under", "the", "light", "of", "an", "old", "lamp",
    "post", "beside", "a", "wooden", "bench", "where", "two", "children", "sit", "with", "a", "brown", "dog",
    "and", "a", "green", "bicycle", "leaning", "against", "the", "wall", "of", "the", "bakery",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_workload_args(p)
    p.add_argument("--reps", type=int, default=300, help="accepted interleaved rounds wanted (after --warmup)")
    p.add_argument("--max-foreign-cores", type=float, default=0.2,
                   help="reject a round when other processes kept more cores busy than this (negative: keep all)")
    p.add_argument("--max-timing-seconds", type=float, default=420.0,
                   help="stop adding rounds after this long even if fewer than --reps were accepted")
    p.add_argument("--warmup", type=int, default=2, help="untimed generate calls per model before timing")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per generate (min = max)")
    p.add_argument("--prompt-tokens", type=int, default=304, help="total prompt length, image tokens included")
    p.add_argument("--image-size", type=int, default=448, help="side of the square synthetic image, px")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the image")
    p.add_argument("--rss-runs", type=int, default=2, help="fresh processes per variant for peak RSS (0 = skip)")
    p.add_argument("--no-jemalloc", action="store_true", help="do not re-exec under jemalloc")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # fresh-process RSS run
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is measured over tokens 2..N)")
    if args.reps < 1 or args.threads < 1:
        p.error("--reps and --threads must be >= 1")
    return args


# ============================================================================ workload
def build_padt(config_dir: str, seed: int):
    """The PaDT model of the bench config in eval mode; `vis_norm` drawn from N(0, initializer_range) so that greedy
    decoding can pick VRTs, as a trained model does (see `_common.build_padt_model`)."""
    return common.build_padt_model(config_dir, seed, vis_norm_mean=0.0).eval()


def build_vanilla(config_dir: str, seed: int, base_state: dict | None = None):
    """Vanilla Qwen2.5-VL of the same config with the PaDT base weights, eval mode."""
    return common.build_vanilla_model(config_dir, seed, base_state).eval()


def synthetic_image(size: int, seed: int):
    """A deterministic `size` x `size` RGB image: a colour gradient with a few filled shapes (no scikit-image)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = np.stack([xx, yy, 1 - xx * yy], -1) * 200 + rng.normal(0, 8, (size, size, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 10, size // 3, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=colour)
    return image


@dataclass
class Workload:
    """Model inputs (`input_ids`, `attention_mask`, `mm_token_type_ids` (1, L); `pixel_values`, `image_grid_thw`)."""

    inputs: dict
    prompt: str
    pad_token_id: int
    eos_token_id: int


def build_workload(processor_dir: str, image_size: int, prompt_tokens: int, seed: int) -> Workload:
    """Tokenizer + PIL image processor from `processor_dir` (no torchvision), the chat template with one image and a
    REC prompt lengthened word by word to exactly `prompt_tokens` ids; `<|image_pad|>` expanded to the image's merged
    cells as `Qwen2_5_VLProcessor` does. `ValueError` when the length cannot be hit exactly."""
    import torch
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(processor_dir)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(processor_dir)
    template = tokenizer.chat_template
    template_file = os.path.join(processor_dir, "chat_template.json")
    if template is None and os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            template = json.load(f)["chat_template"]
    if template is None:
        raise ValueError(f"{processor_dir} has no chat template (tokenizer_config.json or chat_template.json)")

    image = synthetic_image(image_size, seed)
    pixels = image_processor(images=[image], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    n_image_tokens = int(grid.prod()) // image_processor.merge_size**2
    image_pad = "<|image_pad|>"

    def encode(expression: str) -> list[int]:
        content = [{"type": "image"}, {"type": "text", "text": REC_PROMPT.format(expression)}]
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text.replace(image_pad, image_pad * n_image_tokens), add_special_tokens=False)["input_ids"]

    words: list[str] = []
    ids = encode("")
    for i in range(10 * len(FILLER_WORDS)):
        if len(ids) == prompt_tokens:
            break
        trial = encode(" ".join(words + [FILLER_WORDS[i % len(FILLER_WORDS)]]))
        if len(trial) <= prompt_tokens:
            words.append(FILLER_WORDS[i % len(FILLER_WORDS)])
            ids = trial
    if len(ids) != prompt_tokens:
        raise ValueError(f"cannot build a prompt of exactly {prompt_tokens} tokens (got {len(ids)}; the image alone "
                         f"takes {n_image_tokens})")
    input_ids = torch.tensor([ids])
    image_token_id = tokenizer.convert_tokens_to_ids(image_pad)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == image_token_id).int(),
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": grid,
    }
    return Workload(inputs, REC_PROMPT.format(" ".join(words)), tokenizer.pad_token_id,
                    tokenizer.convert_tokens_to_ids("<|im_end|>"))


# ============================================================================ measurement
class ForwardClock:
    """Forward hook on a model: when its first forward call of a `generate` returned (perf_counter and time_ns)."""

    def __init__(self, model: Any) -> None:
        self.handle = model.register_forward_hook(self._after)
        self.reset()

    def reset(self) -> None:
        self.calls, self.first_exit, self.first_exit_ns = 0, None, None

    def _after(self, module: Any, args: Any, output: Any) -> None:
        if self.calls == 0:
            self.first_exit, self.first_exit_ns = time.perf_counter(), time.time_ns()
        self.calls += 1


class Runner:
    """One model, its inputs and generation settings; `__call__` runs one timed greedy `generate`."""

    def __init__(self, model: Any, workload: Workload, new_tokens: int) -> None:
        self.model, self.workload, self.new_tokens = model, workload, new_tokens
        self.clock = ForwardClock(model)
        self.gen_kwargs = {
            "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "num_beams": 1,
            "pad_token_id": workload.pad_token_id, "eos_token_id": workload.eos_token_id,
        }
        self.last_sequence: list[int] = []

    def generate(self):
        import torch

        self.clock.reset()
        with torch.inference_mode():
            out = self.model.generate(**self.workload.inputs, **self.gen_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new = sequences[0, self.workload.inputs["input_ids"].shape[1]:]
        if new.numel() != self.new_tokens or self.clock.calls != self.new_tokens:
            raise RuntimeError(f"generate made {new.numel()} tokens in {self.clock.calls} forward calls, "
                               f"expected {self.new_tokens}")
        self.last_sequence = new.tolist()
        return out

    def __call__(self) -> dict[str, float]:
        start = time.perf_counter()
        self.generate()
        end = time.perf_counter()
        return {
            "prefill_s": self.clock.first_exit - start,  # padt encodes the image in generate before its first forward
            "decode_s": (end - self.clock.first_exit) / (self.new_tokens - 1),
            "total_s": end - start,
        }

    def allocator_bytes(self) -> dict[str, float]:
        """Allocator traffic of one generate: prefill (up to the first forward's return) and per decode token."""
        _, counted = common.allocated_bytes(self.generate, split_ns=lambda: self.clock.first_exit_ns)
        steps = self.new_tokens - 1
        return {
            "prefill_bytes": counted.bytes_before,
            "decode_bytes": counted.bytes_after / steps,
            "decode_allocs": counted.allocs_after / steps,
            "prefill_ops": counted.ops_before,
            "decode_ops": counted.ops_after / steps,
        }


def check_same_llm(padt_model: Any, vanilla: Any, workload: Workload, vrt_base_id: int) -> dict[str, Any]:
    """Step-0 logits of both models over the prompt: PaDT's text columns must equal vanilla's (same base weights), and
    PaDT's prototype columns must be finite for the row's own image. `RuntimeError` otherwise."""
    import torch

    with torch.inference_mode():
        ours = padt_model(**workload.inputs, use_cache=False).logits
        theirs = vanilla(**workload.inputs, use_cache=False).logits
    text, vrt = ours[..., :vrt_base_id], ours[..., vrt_base_id:]
    diff = float((text - theirs).abs().max())
    scale = float(theirs.abs().max())
    same_argmax = bool((text[:, -1].argmax(-1) == theirs[:, -1].argmax(-1)).all())
    if diff > 1e-4 * max(scale, 1.0) or not same_argmax or not bool(torch.isfinite(vrt).all()):
        raise RuntimeError(
            f"PaDT's text logits differ from vanilla's: max |diff| {diff:.3g} (logit scale {scale:.3g}), same "
            f"last-position argmax {same_argmax}; the two models do not run the same LLM"
        )
    return {"max_abs_diff_text_logits": diff, "logit_scale": scale, "same_step0_text_argmax": same_argmax,
            "vrt_columns": int(vrt.shape[-1])}


def child_main(args: argparse.Namespace) -> None:
    """Fresh process for one variant: build it, warm up, run the workload; print its peak RSS (VmHWM) as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    after_imports = common.vm_hwm_bytes()
    workload = build_workload(args.processor, args.image_size, args.prompt_tokens, args.seed)
    model = build_padt(args.config, args.seed) if args.child == "padt" else build_vanilla(args.config, args.seed)
    runner = Runner(model, workload, args.new_tokens)
    for _ in range(max(args.warmup, 1) + 1):
        runner()
    print(json.dumps({"variant": args.child, "vm_hwm": common.vm_hwm_bytes(), "vm_hwm_after_imports": after_imports,
                      "ru_maxrss_self": common.self_ru_maxrss_bytes(), "allocator": common.allocator_status()}))


def measure_rss(args: argparse.Namespace) -> dict[str, dict[str, list[int]]]:
    """Peak RSS of each variant in `args.rss_runs` fresh processes each, alternating which goes first.

    Returns variant -> {"peak": VmHWM at the end, "after_imports": VmHWM before the model was built,
    "ru_maxrss_wait4": the parent's view (inflated by the parent's own high-water mark, kept for reference)}.
    """
    base = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--processor", args.processor,
            "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--prompt-tokens",
            str(args.prompt_tokens), "--image-size", str(args.image_size), "--seed", str(args.seed),
            "--warmup", "1"]
    out: dict[str, dict[str, list[int]]] = {
        v: {"peak": [], "after_imports": [], "ru_maxrss_wait4": []} for v in VARIANTS
    }
    for r in range(args.rss_runs):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            maxrss, stdout = common.run_fresh(base + ["--child", variant], env=dict(os.environ))
            child = common.last_json_line(stdout)
            if child.get("vm_hwm") is None:
                raise RuntimeError("the child could not read /proc/self/status (VmHWM); peak RSS needs Linux")
            out[variant]["peak"].append(child["vm_hwm"])
            out[variant]["after_imports"].append(child["vm_hwm_after_imports"])
            out[variant]["ru_maxrss_wait4"].append(maxrss)
    return out


# ============================================================================ report
def fmt_value(key: str, value: float) -> str:
    if key.endswith("_s"):
        return common.fmt_seconds(value)
    if key.endswith(("_ops", "_allocs")):
        return f"{value:.1f}"
    return common.fmt_bytes(value)


def build_report(timings: dict, alloc: dict, rss: dict | None, meta: dict) -> dict:
    """All figures: per-variant medians/quartiles, paired ratios, authors' ratios and targets."""
    rows = {}
    for key, label, authors, target in METRICS:
        if key in TIMED:
            values = {v: common.summarize(timings[v][key]).as_dict() for v in VARIANTS}
            paired = common.paired_ratios(timings["padt"][key], timings["vanilla"][key])
            ratio = common.summarize(paired).as_dict()
            ratio["median_ci95"] = list(common.median_ci(paired))
        elif key in PROFILED:
            values = {v: {"median": alloc[v][key], "p25": alloc[v][key], "p75": alloc[v][key], "n": 1}
                      for v in VARIANTS}
            r = alloc["padt"][key] / alloc["vanilla"][key]
            ratio = {"median": r, "p25": r, "p75": r, "n": 1}
        else:
            if not rss:
                continue
            peaks = {v: rss[v]["peak"] for v in VARIANTS}
            values = {v: common.summarize(peaks[v]).as_dict() for v in VARIANTS}
            r = values["padt"]["median"] / values["vanilla"]["median"]
            lo = min(peaks["padt"]) / max(peaks["vanilla"])
            hi = max(peaks["padt"]) / min(peaks["vanilla"])
            ratio = {"median": r, "p25": lo, "p75": hi, "n": len(rss["padt"]), "note": "ratio of medians [min, max]"}
        rows[key] = {"label": label, **{v: values[v] for v in VARIANTS}, "ratio": ratio, "authors_ratio": authors,
                     "target": target, "met": None if target is None else ratio["median"] <= target}
    return {"meta": meta, "metrics": rows, "allocator_detail": alloc, "raw_timings": timings, "raw_rss": rss}


def print_table(report: dict) -> None:
    head = ("metric", "padt", "vanilla", "ratio [p25, p75]", "authors", "target", "met")
    lines = [head]
    noisy = report["meta"].get("timing_rounds", {}).get("used") == "all"  # timed "met" is then unknown: "?"
    for key, row in report["metrics"].items():
        r = row["ratio"]
        lines.append((
            row["label"], fmt_value(key, row["padt"]["median"]), fmt_value(key, row["vanilla"]["median"]),
            f"{r['median']:.3f} [{r['p25']:.3f}, {r['p75']:.3f}]",
            "-" if row["authors_ratio"] is None else f"{row['authors_ratio']:.2f}",
            "-" if row["target"] is None else f"<= {row['target']:.2f}",
            "-" if row["met"] is None else ("?" if key in TIMED and noisy else ("yes" if row["met"] else "NO")),
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is None:
        common.reexec_with_jemalloc(enabled=not args.no_jemalloc)
    else:
        child_main(args)
        return
    import torch
    import transformers

    wall = time.perf_counter()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    print(f"allocator: {common.allocator_status()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")

    workload = build_workload(args.processor, args.image_size, args.prompt_tokens, args.seed)
    padt_model = build_padt(args.config, args.seed)
    vanilla = build_vanilla(args.config, args.seed, padt_model.state_dict())
    vrt_base = padt_model.config.vrt_base_id
    grid = workload.inputs["image_grid_thw"]
    n_cells = int(grid.prod()) // padt_model.config.spatial_merge_size**2
    print(f"workload: prompt {workload.inputs['input_ids'].shape[1]} tokens ({n_cells} image tokens = VRT "
          "prototypes), "
          f"pixel_values {tuple(workload.inputs['pixel_values'].shape)}, {args.new_tokens} new tokens, "
          f"params padt {sum(p.numel() for p in padt_model.parameters()) / 1e6:.2f} M / vanilla "
          f"{sum(p.numel() for p in vanilla.parameters()) / 1e6:.2f} M")

    check = check_same_llm(padt_model, vanilla, workload, vrt_base)
    print(f"same LLM: text logits max |diff| {check['max_abs_diff_text_logits']:.2e}, step-0 argmax equal")

    runners = {"padt": Runner(padt_model, workload, args.new_tokens),
               "vanilla": Runner(vanilla, workload, args.new_tokens)}
    limit = None if args.max_foreign_cores < 0 else args.max_foreign_cores
    rounds = common.interleaved(runners, reps=args.reps, warmup=args.warmup, max_foreign_cores=limit,
                                max_seconds=args.max_timing_seconds)
    clean = rounds.n_accepted >= min(args.reps, MIN_CLEAN_ROUNDS)
    timings = rounds.values(accepted_only=clean)
    print(f"timing: {len(rounds.accepted)} rounds in {rounds.seconds:.0f} s, {rounds.n_accepted} accepted (other "
          f"processes kept <= {limit} cores busy)" + ("" if clean else "; too few, so ALL rounds are used"))
    padt_seq, vanilla_seq = runners["padt"].last_sequence, runners["vanilla"].last_sequence
    n_vrt = sum(t >= vrt_base for t in padt_seq)
    shared = next((i for i, (a, b) in enumerate(zip(padt_seq, vanilla_seq)) if a != b), len(padt_seq))
    print(f"greedy: padt emitted {n_vrt} VRT tokens of {len(padt_seq)}; the two sequences agree on the first {shared}")

    alloc = {v: runners[v].allocator_bytes() for v in VARIANTS}
    rss = measure_rss(args) if args.rss_runs > 0 else None

    meta = {
        "allocator": common.allocator_status(), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": args.threads, "reps": args.reps, "warmup": args.warmup, "new_tokens": args.new_tokens,
        "prompt_tokens": int(workload.inputs["input_ids"].shape[1]), "image_tokens": n_cells,
        "image_size": args.image_size, "seed": args.seed, "config": args.config, "processor": args.processor,
        "prompt": workload.prompt, "padt_vrt_tokens_emitted": n_vrt, "sequences_agree_first": shared,
        "correctness": check,
    }
    meta["loadavg_1_5_15_start"], meta["loadavg_1_5_15_end"] = load_start, os.getloadavg()
    known = [c for c in rounds.foreign_cores if c is not None]
    meta["timing_rounds"] = {"run": len(rounds.accepted), "accepted": rounds.n_accepted,
                             "used": "accepted" if clean else "all",
                             "max_foreign_cores": limit, "foreign_cores_per_round": rounds.foreign_cores,
                             "seconds": rounds.seconds}
    report = build_report(timings, alloc, rss, meta)
    report["meta"]["wall_s"] = time.perf_counter() - wall
    print()
    print_table(report)
    used = [c for c, ok in zip(rounds.foreign_cores, rounds.accepted) if c is not None and (ok or not clean)]
    mean_used = f"{sum(used) / len(used):.2f}" if used else "unknown"
    mean_all = f"{sum(known) / len(known):.2f}" if known else "unknown"
    print(f"\ntimed ratios over {rounds.n_accepted if clean else len(rounds.accepted)} interleaved rounds; other "
          f"processes kept {mean_used} of {os.cpu_count()} cores busy on average in those ({mean_all} over all "
          f"{len(rounds.accepted)} rounds); wall time {report['meta']['wall_s']:.0f} s")
    for key in TIMED:
        row = report["metrics"][key]
        lo, hi = row["ratio"]["median_ci95"]
        print(f"{row['label']}: median ratio {row['ratio']['median']:.3f}, 95 % bootstrap CI of the median "
              f"[{lo:.3f}, {hi:.3f}]")
    if not clean:
        print("WARNING: the machine was busy: timed ratios come from rounds with competing processes and are noise "
              "(the profiled and RSS figures are not affected); rerun on an idle machine")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
