"""PaDT vs vanilla Qwen2.5-VL SFT training step, measured side by side (bench/README.md, bench/workload/README.md).

Workload (the authors' anchor): the bench config with random weights from a fixed seed (vanilla gets the PaDT model's
base weights), 4 samples of one 448x448 image (256 merged cells) with 2 masked objects each (5 VRTs per object),
fp32, sdpa, 2 threads, train mode, no activation checkpointing. One step = forward + loss + backward, no optimizer.

* padt: `padt.train.step.compute_padt_loss` (robust CE over text + VRT logits at completion positions, decoder on
  the objects' hidden states, box/score/mask losses) and `backward`, on the batch `padt.data.PaDTCollator` builds
  from generated records (`padt.testing.sft_data`) in the released JSONL format.
* vanilla: transformers' `Qwen2_5_VLForConditionalGeneration(**inputs, labels=labels)` (stock next-token CE over the
  full sequence, what a plain SFT trainer runs) and `backward` on the same sequences, VRT ids replaced by a text id and
  labels -100 outside the completion.
* vision: the vision tower alone (forward + backward of its outputs), to remove its time, which is the same in both.

Figures, padt / vanilla: step time; step time without the vision encoder ((padt - vision) / (vanilla - vision) per
round); peak RSS of each variant in its own fresh process (the authors' memory figure) and the peak of live tensor
bytes in one step (torch profiler, deterministic). Timings interleave the three in one process in rotating order after
a warm-up, under jemalloc (re-exec when installed), and report medians of paired ratios with 25th/75th percentiles.

    python bench/bench_train_step.py --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # bench/ is a folder of scripts, not a package

VARIANTS = ("padt", "vanilla")
# (key, label, authors' ratio, target ratio)
METRICS = (
    ("step_s", "training step (forward + loss + backward)", 1.14, 1.05),
    ("step_no_vit_s", "same, vision encoder time removed", 1.67, 1.25),
    ("peak_rss", "peak RSS (fresh process)", 1.10, 1.05),
    ("peak_live", "peak live tensor bytes in a step (profiler)", None, None),
    ("ce_only_s", "info: padt without decoder losses (LLM side only)", None, None),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_workload_args(p)
    p.add_argument("--reps", type=int, default=20, help="interleaved rounds (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--samples", type=int, default=4, help="samples per batch")
    p.add_argument("--image-size", type=int, default=448, help="side of the square generated images, px")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the images and the VRT picks")
    p.add_argument("--rss-runs", type=int, default=2, help="fresh processes per variant for peak RSS (0 = skip)")
    p.add_argument("--max-foreign-cores", type=float, default=0.5,
                   help="reject rounds during which other processes kept more cores busy (2-core VMs; -1 = keep all)")
    p.add_argument("--max-seconds", type=float, default=1800.0,
                   help="stop collecting rounds after this long even if fewer than --reps were accepted")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the informative 'padt without decoder' variant (CE only)")
    p.add_argument("--no-jemalloc", action="store_true", help="do not re-exec under jemalloc")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # fresh-process RSS run
    args = p.parse_args(argv)
    if args.reps < 1 or args.threads < 1 or args.samples < 1:
        p.error("--reps, --threads and --samples must be >= 1")
    return args


# ============================================================================ workload
def build_padt(config_dir: str, seed: int):
    """The PaDT model of the bench config in train mode, `vis_norm` ~ N(1, initializer_range) as after training."""
    return common.build_padt_model(config_dir, seed, vis_norm_mean=1.0).train()


def build_vanilla(config_dir: str, seed: int, base_state: dict | None = None):
    """Vanilla Qwen2.5-VL of the same config with the PaDT base weights, train mode."""
    return common.build_vanilla_model(config_dir, seed, base_state).train()


def build_batches(config_dir: str, processor_dir: str, samples: int, image_size: int, seed: int) -> tuple[dict, dict]:
    """(padt batch from the collator, vanilla inputs with labels) for `samples` generated images, 2 objects each.
    Needs no model: V comes from the config, the mask resolution from the decoder's sub-pixel split."""
    import torch

    from padt import PaDTConfig
    from padt.data import PaDTCollator, PaDTDataset
    from padt.model.decoder.decoder import MASK_SUBPIXEL_SPLIT
    from padt.processing import PaDTProcessor
    from padt.testing.sft_data import make_tiny_sft_data

    vrt_base_id = PaDTConfig.from_pretrained(config_dir).vrt_base_id
    mask_upscale = MASK_SUBPIXEL_SPLIT * MASK_SUBPIXEL_SPLIT

    processor = PaDTProcessor.from_pretrained(processor_dir, vrt_base_id=vrt_base_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_sft_data(tmp, num_images=samples, num_empty=0, seed=seed,
                                  sizes=((image_size, image_size),), objects_per_image=2, tasks=("ovd", "ric"))
        dataset = PaDTDataset(str(path), processor, image_folders=os.path.join(tmp, "images"))
        collator = PaDTCollator(processor, num_vrt=5, seed=seed, mask_upscale=mask_upscale)
        batch = collator([dataset[i] for i in range(len(dataset))])
    if batch["num_objects"] != 2 * samples:
        raise RuntimeError(f"expected {2 * samples} objects, the batch has {batch['num_objects']}")
    input_ids = batch["input_ids"].clone()
    text_id = processor.tokenizer.convert_tokens_to_ids("<|vision_pad|>")  # any text id: same length, no VRT ids
    input_ids[input_ids >= vrt_base_id] = text_id
    P = batch["prompt_length"]
    labels = torch.full_like(input_ids, -100)
    labels[:, P:] = input_ids[:, P:].masked_fill(batch["completion_mask"] == 0, -100)
    vanilla = {"input_ids": input_ids, "attention_mask": batch["attention_mask"],
               "mm_token_type_ids": batch["mm_token_type_ids"], "pixel_values": batch["pixel_values"],
               "image_grid_thw": batch["image_grid_thw"], "labels": labels}
    return batch, vanilla


def make_steps(padt_model: Any, vanilla_model: Any, padt_batch: dict, vanilla_inputs: dict) -> dict[str, Any]:
    """Callables running one untimed-setup step each; they return the step's loss (a float)."""
    from padt.train.criterion import PaDTCriterion
    from padt.train.step import compute_padt_loss

    criterion = PaDTCriterion()
    ce_only = PaDTCriterion(use_bbox_loss=False, use_score_loss=False, use_mask_loss=False)

    def padt_step() -> float:
        loss, _ = compute_padt_loss(padt_model, padt_batch, criterion=criterion, use_prototype_features=False)
        loss.backward()
        return float(loss.detach())

    def padt_ce_step() -> float:  # the LLM side of PaDT only: prototypes, VRT logits, robust CE (no decoder)
        loss, _ = compute_padt_loss(padt_model, padt_batch, criterion=ce_only, use_prototype_features=False)
        loss.backward()
        return float(loss.detach())

    def vanilla_step() -> float:
        loss = vanilla_model(**vanilla_inputs, use_cache=False).loss
        loss.backward()
        return float(loss.detach())

    def vision_step() -> float:
        model = padt_model if padt_model is not None else vanilla_model
        out = model.model.visual(padt_batch["pixel_values"], grid_thw=padt_batch["image_grid_thw"])
        loss = out.pooler_output.sum() + out.last_hidden_state.sum()
        loss.backward()
        return float(loss.detach())

    return {"padt": padt_step, "vanilla": vanilla_step, "vision": vision_step, "padt_ce": padt_ce_step}


def timed(step, model) -> dict[str, float]:
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return {"step_s": elapsed}


def peak_live_bytes(fn) -> int:
    """Peak of live bytes above the start while `fn()` runs (alloc/free records of the torch profiler, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]"), key=lambda x: x[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ============================================================================ fresh-process memory
def child(args: argparse.Namespace) -> None:
    """One variant alone in this process: build, warm up, one step; print peak RSS (VmHWM) as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    padt_batch, vanilla_inputs = build_batches(args.config, args.processor, args.samples, args.image_size, args.seed)
    if args.child == "vanilla":
        model = build_vanilla(args.config, args.seed)
        steps = make_steps(None, model, padt_batch, vanilla_inputs)
    else:
        model = build_padt(args.config, args.seed)
        steps = make_steps(model, None, padt_batch, vanilla_inputs)
    for _ in range(2):
        timed(steps[args.child], model)
    print(json.dumps({"variant": args.child, "peak_rss": common.vm_hwm_bytes()}))


def fresh_rss(args: argparse.Namespace) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rss_runs):
        for variant in VARIANTS:
            argv = [sys.executable, os.path.abspath(__file__), "--child", variant, "--config", args.config,
                    "--processor", args.processor, "--threads", str(args.threads), "--samples", str(args.samples),
                    "--image-size", str(args.image_size), "--seed", str(args.seed)]
            _, stdout = common.run_fresh(argv, env=dict(os.environ), timeout=900)
            out[variant].append(float(common.last_json_line(stdout)["peak_rss"]))
    return out


# ============================================================================ main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    common.reexec_with_jemalloc(not args.no_jemalloc)
    import torch

    torch.set_num_threads(args.threads)
    print(f"allocator: {common.allocator_status()}; threads {args.threads}; torch {torch.__version__}")
    padt = build_padt(args.config, args.seed)
    vanilla = build_vanilla(args.config, args.seed, padt.state_dict())
    padt_batch, vanilla_inputs = build_batches(args.config, args.processor, args.samples, args.image_size, args.seed)
    steps = make_steps(padt, vanilla, padt_batch, vanilla_inputs)
    print(f"batch: {args.samples} x {args.image_size}px, {padt_batch['num_objects']} objects, "
          f"{tuple(padt_batch['input_ids'].shape)} ids (prompt {padt_batch['prompt_length']}), "
          f"{padt_batch['vrt_rows'].shape[0]} VRT targets; losses padt {steps['padt']():.3f}, "
          f"vanilla {steps['vanilla']():.3f}")
    padt.zero_grad(set_to_none=True)
    vanilla.zero_grad(set_to_none=True)

    owners = {"padt": padt, "vanilla": vanilla, "vision": padt, "padt_ce": padt}
    names = ("padt", "vanilla", "vision") + (() if args.no_breakdown else ("padt_ce",))
    runs = {name: (lambda n=name: timed(steps[n], owners[n])) for name in names}
    rounds = common.interleaved(runs, reps=args.reps, warmup=args.warmup,
                                max_foreign_cores=None if args.max_foreign_cores < 0 else args.max_foreign_cores,
                                max_seconds=args.max_seconds)
    times = rounds.values()
    if rounds.n_accepted == 0:
        print(f"no round had <= {args.max_foreign_cores} foreign busy cores in {rounds.seconds:.0f} s; using all rounds")
        times = rounds.values(accepted_only=False)
    foreign = [c for c in rounds.foreign_cores if c is not None]
    print(f"rounds: {rounds.n_accepted} accepted of {len(rounds.accepted)} (other processes' busy cores per round: "
          f"median {common.summarize(foreign).median if foreign else float('nan'):.2f})")
    t_padt, t_van, t_vis = (times[n]["step_s"] for n in ("padt", "vanilla", "vision"))
    ratios = {
        "step_s": common.paired_ratios(t_padt, t_van),
        "step_no_vit_s": [(p - v) / (q - v) for p, q, v in zip(t_padt, t_van, t_vis)],
    }
    if "padt_ce" in times:
        ratios["ce_only_s"] = common.paired_ratios(times["padt_ce"]["step_s"], t_van)
    live = {}
    for name in VARIANTS:
        live[name] = peak_live_bytes(steps[name])
        owners[name].zero_grad(set_to_none=True)
    ratios["peak_live"] = [live["padt"] / live["vanilla"]]
    rss = fresh_rss(args) if args.rss_runs > 0 else None
    if rss:
        ratios["peak_rss"] = common.paired_ratios(rss["padt"], rss["vanilla"])

    results: dict[str, Any] = {
        "allocator": common.allocator_status(), "threads": args.threads, "reps": args.reps,
        "rounds": {"accepted": rounds.n_accepted, "total": len(rounds.accepted), "foreign_cores": rounds.foreign_cores},
        "absolute": {
            "padt_step_s": common.summarize(t_padt).as_dict(), "vanilla_step_s": common.summarize(t_van).as_dict(),
            "vision_step_s": common.summarize(t_vis).as_dict(), "peak_live_bytes": live, "peak_rss_bytes": rss,
        },
        "ratios": {},
    }
    print(f"\n{'padt / vanilla':48s} {'median':>8s} {'[p25, p75]':>16s} {'authors':>8s} {'target':>8s}")
    for key, label, authors, target in METRICS:
        if key not in ratios:
            continue
        s = common.summarize(ratios[key])
        results["ratios"][key] = {**s.as_dict(), "authors": authors, "target": target,
                                  "meets_target": None if target is None else s.median <= target}
        a = "-" if authors is None else f"{authors:.2f}"
        t = "-" if target is None else f"<= {target:.2f}"
        print(f"{label:48s} {s.median:8.3f} {f'[{s.p25:.3f}, {s.p75:.3f}]':>16s} {a:>8s} {t:>8s}")
    print(f"\nabsolute medians: padt {common.fmt_seconds(results['absolute']['padt_step_s']['median'])}, vanilla "
          f"{common.fmt_seconds(results['absolute']['vanilla_step_s']['median'])}, vision "
          f"{common.fmt_seconds(results['absolute']['vision_step_s']['median'])}; peak live "
          f"{common.fmt_bytes(live['padt'])} vs {common.fmt_bytes(live['vanilla'])}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
