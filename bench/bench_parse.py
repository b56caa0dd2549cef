#!/usr/bin/env python
"""Parser benchmark: our id-table parser vs a re-implementation of the authors' per-token string method.

Checks first that our parser recovers every object (label and VRT ids) listed in ``completions.jsonl``, then times,
interleaved in one process after a warm-up, completions per second at batch 1 and batch 16 for:

- ``authors``: the method of the authors' ``parseVRTintoCompletion`` (``src/PaDT/models/padt_processor.py``;
  docs/method.md#parsing-completions): decode every completion token separately with a tokenizer that holds the
  `<|empty_token_*|>`/`<|VRT_*|>` strings (as the authors' ``prepare``/``set_image_grid_thw`` build it), string
  matching per token, hidden-state rows from the generation layout ``hidden_states[t][-1][b]``, the per-sample
  ``try/except``; with prototypes: re-tokenise each VRT string and gather rows with the ``// 4`` offset.
- ``ours: parse only``: ``CompletionParser.parse_batch`` (labels, VRT ids, positions; no torch).
- ``ours: parse + features``: the same + ``gather_object_features`` (one ``index_select`` per batch on a
  `(B, T, H)` last-layer tensor) [+ ``gather_object_prototypes``].
- ``ours-compat``: our ``parseVRTintoCompletion`` on the same generation layout as ``authors``.

Both variants are timed as the authors' demo calls the parser (no prototypes) and as their trainer does (with).
The authors measured 1889 completions/s at batch 1 and 1022/s at batch 16 on this kind of machine.

Usage:  python bench/bench_parse.py [--processor DIR] [--completions FILE] [--config FILE] [--repeats 7]
(defaults: the workload in bench/workload/, see its README.md)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoTokenizer

from padt.legacy import parseVRTintoCompletion
from padt.processing import PaDTProcessor, load_processor
from padt.processing.features import gather_object_features, gather_object_prototypes

AUTHORS_MEASURED = {1: 1889.0, 16: 1022.0}


# ---------------------------------- the authors' method (`parseVRTintoCompletion`, src/PaDT/models/padt_processor.py)
def authors_tokenizer(processor_dir: str, vrt_base_id: int, num_vrt: int):
    """Tokenizer as the authors' wrapper leaves it: empty tokens up to V, then `<|VRT_0..n-1|>` from id V."""
    tok = AutoTokenizer.from_pretrained(processor_dir)
    n_empty = vrt_base_id - len(tok)
    tok.add_special_tokens({"additional_special_tokens": [f"<|empty_token_{i}|>" for i in range(n_empty)]},
                           replace_extra_special_tokens=False)
    tok.add_tokens([f"<|VRT_{i}|>" for i in range(num_vrt)])
    if tok.convert_tokens_to_ids("<|VRT_0|>") != vrt_base_id:
        raise RuntimeError("could not rebuild the authors' tokenizer layout (<|VRT_0|> != V)")
    return tok


def authors_parse(tokenizer, vrt_base_id, completion_ids, hidden_states, need_thinking_mask=None,
                  image_prototype=None, image_grid_thw=None, eos="<|im_end|>"):
    """Re-implementation of the authors' per-token string parser (`parseVRTintoCompletion`), for timing and
    reference."""
    B = completion_ids.shape[0]
    need = [True] * B if need_thinking_mask is None else [bool(x) for x in need_thinking_mask]
    completions, feats, labels, vrts, vrts_feats = [], [], [], [], []
    for b in range(B):
        toks = [tokenizer.decode(t) for t in completion_ids[b]]  # 4.50's batch_decode of a 1-D tensor: per token
        completions.append("".join(toks))
        f_b, l_b, v_b, vf_b = [], [], [], []
        try:
            in_answer, in_label, label, current, t, n = not need[b], False, "", "", 0, len(toks)
            while t < n:
                s = toks[t]
                if eos in s:
                    break
                if not in_answer:
                    if "<" in s and "</" not in s and "answer" in toks[t + 1] and ">" in toks[t + 2]:
                        in_answer, t = True, t + 3
                        continue
                    t += 1
                    continue
                if need[b] and "</" in s and "answer" in toks[t + 1]:
                    break
                if "<|VRT_" in s:
                    run = []
                    while t < n and "<|VRT_" in toks[t]:
                        run.append(t)
                        t += 1
                    f_b.append(torch.cat([hidden_states[i][-1][b] for i in run]))
                    l_b.append(current)
                    v_b.append("".join(toks[i] for i in run))
                    if image_prototype is not None and image_grid_thw is not None:
                        ids = tokenizer(v_b[-1], return_tensors="pt").input_ids[0]
                        offset = int(image_grid_thw[:b].prod(-1).sum()) // 4
                        vf_b.append(image_prototype[ids - vrt_base_id + offset])
                    continue
                if '"' in s:
                    if not in_label:
                        in_label, label = True, s[s.index('"') + 1 :]
                    else:
                        label += s[: s.index('"')]
                        in_label, current = False, label.strip()
                elif in_label:
                    label += s
                t += 1
        except Exception:  # noqa: BLE001 -- the original's bare except: drop the sample's objects
            f_b, l_b, v_b, vf_b = [], [], [], []
        feats.append(f_b)
        labels.append(l_b)
        vrts.append(v_b)
        vrts_feats.append(vf_b)
    return completions, feats, labels, vrts, vrts_feats


# ----------------------------------------------------------------------------- workload
def make_batches(rows, batch_size, pad_id, hidden_size, num_layers, side, merge, gen):
    """Right-padded id batches with random hidden states in both layouts and per-image prototypes.

    Every completion gets one image of ``side x side`` merged cells.
    """
    cells_per_image = side * side
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        T = max(len(r["token_ids"]) for r in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, : len(r["token_ids"])] = torch.tensor(r["token_ids"])
        last = torch.randn(T, len(chunk), 1, hidden_size, generator=gen)
        dummy = torch.zeros(1)
        generation_layout = tuple((dummy,) * num_layers + (last[t],) for t in range(T))  # [step][layer] (B, 1, H)
        batches.append({
            "ids": ids,
            "gen_hs": generation_layout,
            "hs": last[:, :, 0].transpose(0, 1).contiguous(),  # (B, T, H), same values
            "grid": torch.tensor([[1, side * merge, side * merge]] * len(chunk)),
            "protos": torch.randn(len(chunk) * cells_per_image, hidden_size, generator=gen),
        })
    return batches


def main() -> None:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workload")  # wherever the script is run from
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processor", default=os.path.join(here, "processor"))
    ap.add_argument("--completions", default=os.path.join(here, "completions.jsonl"))
    ap.add_argument("--config", default=None, help="model config.json (default: beside the processor dir)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (less sensitive to other load on the machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config_path = args.config or os.path.join(os.path.dirname(os.path.abspath(args.processor)), "config.json")
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    V, H, L = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    with open(args.completions, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]

    proc = PaDTProcessor(load_processor(args.processor), vrt_base_id=V)
    parser = proc.completion_parser
    max_vrt = max(k for r in rows for o in r["objects"] for k in o["vrt"])
    merge = cfg.get("vision_config", {}).get("spatial_merge_size", proc.spatial_merge_size)
    side = max(2, int((max_vrt + 1) ** 0.5 + 0.999999))  # a square merged grid holding every VRT id
    cells = side * side
    print(f"{len(rows)} completions, V={V}, H={H}, max VRT id {max_vrt}, prototypes: {cells} cells per image")

    # ---- correctness against the listed objects
    mismatches = 0
    for r in rows:
        got = [(o.label, o.vrt_ids) for o in parser.parse(r["token_ids"])]
        want = [(o["label"], o["vrt"]) for o in r["objects"]]
        if got != want:
            mismatches += 1
            if mismatches <= 5:
                print(f"MISMATCH idx {r['idx']}: got {got} want {want}")
    n_obj = sum(len(r["objects"]) for r in rows)
    print(f"ours: {len(rows) - mismatches}/{len(rows)} completions match ({n_obj} objects); mismatches: {mismatches}")
    atok = authors_tokenizer(args.processor, V, cells)
    pad_id = atok.pad_token_id

    gen = torch.Generator().manual_seed(0)
    workloads = {bs: make_batches(rows, bs, pad_id, H, L, side, merge, gen) for bs in (1, 16)}
    ref_mismatch = 0
    for batch in workloads[16]:
        _, _, labels, vrts, _ = authors_parse(atok, V, batch["ids"], batch["gen_hs"], [False] * len(batch["ids"]))
        _, _, labels2, vrts2, _ = parseVRTintoCompletion(proc, batch["ids"], batch["gen_hs"])
        ref_mismatch += sum(a != b for a, b in zip(labels, labels2)) + sum(a != b for a, b in zip(vrts, vrts2))
    print(f"authors' re-implementation vs our parseVRTintoCompletion (labels, VRT strings): "
          f"{ref_mismatch} differences")

    def run_authors(batches, protos):
        for bt in batches:
            authors_parse(atok, V, bt["ids"], bt["gen_hs"], [False] * len(bt["ids"]),
                          bt["protos"] if protos else None, bt["grid"] if protos else None)

    def run_ours_parse(batches, protos):
        for bt in batches:
            parser.parse_batch(bt["ids"])

    def run_ours(batches, protos):
        for bt in batches:
            objs = parser.parse_batch(bt["ids"])
            gather_object_features(bt["hs"], objs)
            if protos:
                gather_object_prototypes(bt["protos"], objs, bt["grid"], proc.codec)

    def run_compat(batches, protos):
        for bt in batches:
            parseVRTintoCompletion(proc, bt["ids"], bt["gen_hs"], None,
                                   bt["protos"] if protos else None, bt["grid"] if protos else None)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    methods = {"authors": run_authors, "ours-parse": run_ours_parse, "ours": run_ours, "ours-compat": run_compat}
    results = {}
    for bs, batches in workloads.items():
        for protos in (False, True):
            for fn in methods.values():  # warm-up
                fn(batches[:20], protos)
            rates = {m: [] for m in methods}
            names = list(methods)
            for rep in range(args.repeats):
                order = names[rep % len(names):] + names[: rep % len(names)]  # rotate the order
                for m in order:
                    t0 = clock()
                    methods[m](batches, protos)
                    rates[m].append(len(rows) / (clock() - t0))
            med = {m: statistics.median(v) for m, v in rates.items()}
            ratio = {m: statistics.median(o / a for o, a in zip(rates[m], rates["authors"])) for m in names[1:]}
            results[(bs, protos)] = (med, ratio)

    print(f"\ncompletions per second ({args.clock} clock), torch threads {args.threads}; median of {args.repeats} "
          "interleaved repeats; "
          "(x) = median of paired ratios to the authors' method")
    head = ("| batch | prototypes | authors' method (re-impl) | ours: parse only | ours: parse + features "
            "| ours: parseVRTintoCompletion | authors measured |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for (bs, protos), (med, ratio) in results.items():
        cells = " | ".join(f"{med[m]:.0f} ({ratio[m]:.1f}x)" for m in ("ours-parse", "ours", "ours-compat"))
        print(f"| {bs} | {'yes' if protos else 'no'} | {med['authors']:.0f} | {cells} | {AUTHORS_MEASURED[bs]:.0f} |")
    for bs in (1, 16):
        parse_rate = results[(bs, False)][0]["ours-parse"]
        print(f"batch {bs}: our parser {parse_rate:.0f}/s = {parse_rate / AUTHORS_MEASURED[bs]:.1f}x the authors' "
              f"measured {AUTHORS_MEASURED[bs]:.0f}/s")


if __name__ == "__main__":
    main()
