"""Completion parsing: oracle strings and features, label rule, malformed/truncated output, feature gathering."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from padt.legacy import VisonTextProcessingClass, parseVRTintoCompletion
from padt.processing import PaDTProcessor, load_processor
from padt.processing.features import gather_object_features, gather_object_prototypes
from padt.processing.parsing import ParsedObject, build_token_table, parse_completion, parse_completions
from padt.processing.vrt import VRTCodec
from padt.testing.tokenizer import build_tiny_processor

ORACLE = Path(__file__).parent / "fixtures" / "oracle_ref"
V = 1024


@pytest.fixture(scope="module")
def pp():
    return PaDTProcessor(build_tiny_processor(), V)


@pytest.fixture(scope="module")
def parser(pp):
    return pp.completion_parser


def objs(parser, pp, text, **kw):
    return [(o.label, o.vrt_ids) for o in parser.parse(pp.encode(text), **kw)]


# ----------------------------------------------------------------------------- oracle
def test_oracle_strings_features_and_prototypes():
    safetensors = pytest.importorskip("safetensors.torch")
    t = safetensors.load_file(str(ORACLE / "io.safetensors"))
    strings = json.loads((ORACLE / "io.json").read_text())["strings"]
    processor = VisonTextProcessingClass(load_processor(ORACLE / "processor"), spatial_merge_size=2)
    processor.prepare(512)
    completion_ids = t["inputs.completion_ids_local"]
    before = completion_ids.clone()
    h, prompt_len = t["forward.hidden_states.2"], 64
    # the trainer's layout: step t holds the state of the position that predicts completion token t
    steps = [(h[:, :1], h[:, prompt_len - 1 + i : prompt_len + i]) for i in range(completion_ids.shape[1])]
    completions, feats, labels, vrts, vrts_feats = parseVRTintoCompletion(
        processor, completion_ids, steps, torch.tensor([False, False]),
        t["forward.past_image_embeds"], t["inputs.image_grid_thw"],
    )
    assert torch.equal(completion_ids, before)
    assert completions == strings["parsed_completions"]
    assert labels == strings["parsed_labels"]
    assert vrts == strings["parsed_vrts"]
    for s, o in [(0, 0), (0, 1), (1, 0)]:
        torch.testing.assert_close(feats[s][o], t[f"decode_hidden.feats.s{s}.o{o}"], atol=0, rtol=0)
        torch.testing.assert_close(vrts_feats[s][o], t[f"decode_proto.feats.s{s}.o{o}"], atol=0, rtol=0)
    # the (B, T, H) layout and gather_object_features agree with the generation layout
    parsed = processor.completion_parser.parse_batch(completion_ids)
    packed, lengths, sample_idx = gather_object_features(h, parsed, position_offset=prompt_len - 1)
    assert lengths == [5, 5, 5] and sample_idx == [0, 0, 1]
    torch.testing.assert_close(packed, torch.cat([feats[0][0], feats[0][1], feats[1][0]]), atol=0, rtol=0)
    protos, _, _ = gather_object_prototypes(t["forward.past_image_embeds"], parsed, t["inputs.image_grid_thw"],
                                            processor.codec)
    torch.testing.assert_close(protos, torch.cat([vrts_feats[0][0], vrts_feats[0][1], vrts_feats[1][0]]))


# ----------------------------------------------------------------------------- label rule
def test_ovd_labels_inherit_across_separators(parser, pp):
    text = ('In this image, there are 1 "motorcycle" (<|VRT_1|><|VRT_2|>), 2 "person" (<|VRT_3|>, <|VRT_4|><|VRT_5|>)'
            ' and 1 "bicycle" (<|VRT_6|>).<|im_end|>')
    assert objs(parser, pp, text) == [("motorcycle", [1, 2]), ("person", [3]), ("person", [4, 5]), ("bicycle", [6])]
    assert objs(parser, pp, 'There are 3 "cat" (<|VRT_0|>, <|VRT_1|>,\n <|VRT_2|>) in this image.<|im_end|>') == [
        ("cat", [0]), ("cat", [1]), ("cat", [2])]


def test_rec_ric_and_caption_labels_do_not_leak(parser, pp):
    assert objs(parser, pp, 'The "the car on the left" refers to <|VRT_7|><|VRT_8|> in this image.<|im_end|>') == [
        ("the car on the left", [7, 8])]
    ric = "A man (<|VRT_0|>) rides a motorcycle (<|VRT_1|>, <|VRT_2|>) on a dirt path.<|im_end|>"
    assert objs(parser, pp, ric) == [("", [0]), ("", [1]), ("", [2])]
    leak = 'A "red box" <|VRT_0|> next to a small ring <|VRT_1|>.<|im_end|>'
    assert objs(parser, pp, leak) == [("red box", [0]), ("", [1])]  # the original gave "red box" twice
    two_quotes = 'Between "a" and "b" there is "c d" <|VRT_3|><|im_end|>'
    assert objs(parser, pp, two_quotes) == [("c d", [3])]
    first_without_label = "<|VRT_4|>, <|VRT_5|><|im_end|>"
    assert objs(parser, pp, first_without_label) == [("", [4]), ("", [5])]


def test_unterminated_quote_gives_no_label(parser, pp):
    assert objs(parser, pp, 'The "red box <|VRT_1|><|im_end|>') == [("", [1])]
    assert objs(parser, pp, 'A "cat" and "do <|VRT_2|><|im_end|>') == [("cat", [2])]  # last complete pair


def test_multibyte_labels(parser, pp):
    assert objs(parser, pp, 'Ein "Bär" und "漢字 ok" <|VRT_1|><|im_end|>') == [("漢字 ok", [1])]


# ----------------------------------------------------------------------------- malformed / truncated
def test_truncated_and_malformed_output_never_raises(parser, pp):
    full = pp.encode('There are 2 "dog" (<|VRT_1|><|VRT_2|>, <|VRT_3|><|VRT_4|>) here.<|im_end|>')
    vrt_positions = [i for i, t in enumerate(full) if t >= V]
    for cut in range(len(full) + 1):  # every prefix: objects parsed so far are kept
        got = parser.parse(full[:cut])
        n_done = sum(1 for p in vrt_positions if p < cut)
        assert sum(len(o.vrt_ids) for o in got) == n_done
        assert all(o.label == "dog" for o in got)
    truncated_in_run = parser.parse(full[: vrt_positions[-1]])
    assert [o.vrt_ids for o in truncated_in_run] == [[1, 2], [3]]
    assert parser.parse([]) == []
    assert parser.parse([pp.tokenizer.eos_token_id, V + 1]) == []  # nothing after eos
    assert [o.vrt_ids for o in parser.parse([V + 7, V + 8])] == [[7, 8]]  # a VRT as the very first token
    junk = [5, 900, 1023, V + 3, 1000, 1001, 3, V + 1, 17]
    assert [o.vrt_ids for o in parser.parse(junk)] == [[3], [1]]
    assert [o.positions for o in parser.parse(junk)] == [[3], [7]]
    with pytest.raises(ValueError, match=">= 0"):
        parser.parse([1, -100, V])


def test_eos_and_padding(parser, pp):
    ids = pp.encode('Found "x" <|VRT_1|>.<|im_end|>') + [pp.tokenizer.pad_token_id] * 3 + [V + 5]
    got = parser.parse(ids)
    assert [(o.label, o.vrt_ids, o.positions) for o in got] == [("x", [1], [ids.index(V + 1)])]
    assert got[0].text_span == (0, ids.index(V + 1))
    assert got[0].vrt_text == "<|VRT_1|>"
    batch = torch.full((2, len(ids)), pp.tokenizer.pad_token_id)
    batch[0] = torch.tensor(ids)
    batch[1, :3] = torch.tensor([V + 2, V + 3, 5])
    assert [[o.vrt_ids for o in r] for r in parser.parse_batch(batch)] == [[[1]], [[2, 3]]]


def test_need_thinking(parser, pp):
    text = 'think "no" <|VRT_9|> <answer>The "cat" <|VRT_1|></answer> "dog" <|VRT_2|><|im_end|>'
    assert objs(parser, pp, text) == [("no", [9]), ("cat", [1]), ("dog", [2])]
    assert objs(parser, pp, text, need_thinking=True) == [("cat", [1])]
    assert objs(parser, pp, 'no tags "a" <|VRT_1|><|im_end|>', need_thinking=True) == []
    assert objs(parser, pp, '<answer>"a" <|VRT_1|> truncated', need_thinking=True) == [("a", [1])]


def test_vrt_ids_outside_the_image_are_dropped_with_a_warning(parser, pp):
    ids = pp.encode('"a" <|VRT_1|><|VRT_40|>, "b" <|VRT_50|><|im_end|>')
    with pytest.warns(UserWarning, match="outside"):
        got = parser.parse(ids, num_cells=16)
    assert [(o.label, o.vrt_ids) for o in got] == [("a", [1])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(parser.parse(ids)) == 2


# ----------------------------------------------------------------------------- API variants
def test_functional_api_and_decode_fn_agree(parser, pp):
    tok = pp.tokenizer
    ids = pp.encode('There is 1 "big cat" (<|VRT_3|>) in this image.<|im_end|>')
    table = build_token_table(tok, V)
    assert len(table) == V and table[1000:1003] == [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]
    assert table[1022] == b""  # ids without a token up to V
    a = parse_completion(ids, vrt_base_id=V, eos_token_id=tok.eos_token_id, token_table=table)
    b = parse_completion(ids, vrt_base_id=V, eos_token_id=tok.eos_token_id, decode_fn=tok.decode)
    assert a == b == parser.parse(ids)
    assert a[0] == ParsedObject("big cat", [3], [ids.index(V + 3)], (0, ids.index(V + 3)))
    # per-token decoding cannot rebuild a character split over tokens; the byte table can
    accented = pp.encode('A "é" <|VRT_1|>')
    assert parse_completion(accented, vrt_base_id=V, token_table=table)[0].label == "é"
    batch = parse_completions([ids, ids[:3]], vrt_base_id=V, token_table=table)
    assert batch == [a, []]
    with pytest.raises(ValueError, match="token_table"):
        parse_completion(ids, vrt_base_id=V)
    assert parser.decode(ids) == pp.decode(ids)


def test_gather_object_features_offsets_and_gradients():
    h = torch.randn(2, 6, 4, requires_grad=True)
    objects = [[ParsedObject("a", [0, 1], [1, 2], (0, 1))], [ParsedObject("b", [3], [0], (0, 0))]]
    feats, lengths, sample_idx = gather_object_features(h, objects, position_offset=[2, 5])
    assert lengths == [2, 1] and sample_idx == [0, 1]
    torch.testing.assert_close(feats, torch.stack([h[0, 3], h[0, 4], h[1, 5]]))
    feats.sum().backward()
    assert h.grad[0, 3].abs().sum() > 0 and h.grad[0, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="outside"):
        gather_object_features(h, objects, position_offset=4)
    with pytest.raises(ValueError, match="rows"):
        gather_object_features(h, objects[:1])
    empty, lengths, _ = gather_object_features(h, [[], []])
    assert empty.shape == (0, 4) and lengths == []


def test_training_step_features_come_from_the_same_gatherer():
    from padt.processing.features import unpack_per_object
    from padt.train.step import object_features

    h, protos = torch.randn(2, 8, 4), torch.randn(10, 4)
    parsed = [[ParsedObject("a", [1, 2], [1, 2], (0, 1)), ParsedObject("b", [2], [4], (3, 4))],
              [ParsedObject("c", [3], [0], (0, 0))]]
    collated = [[{"vrt_positions": o.positions, "vrt_cells": [5 * b + k for k in o.vrt_ids]} for o in objs]
                for b, objs in enumerate(parsed)]  # two images of 5 cells: global cell = 5 b + local cell
    packed, lengths, _ = gather_object_features(h, parsed, position_offset=2)
    for got, want in zip(object_features(collated, hidden=h, prototypes=protos, prompt_length=3,
                                         use_prototype_features=False), unpack_per_object(packed, lengths, parsed)):
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    packed, lengths, _ = gather_object_prototypes(protos, parsed, torch.tensor([[1, 2, 10], [1, 2, 10]]),
                                                  VRTCodec(V, 2))
    for got, want in zip(object_features(collated, hidden=h, prototypes=protos, prompt_length=3,
                                         use_prototype_features=True), unpack_per_object(packed, lengths, parsed)):
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    assert unpack_per_object(torch.zeros(0, 4), [], [[], []]) == [[], []]


def test_gather_object_prototypes_multi_image_rows():
    protos = torch.arange(21.0)[:, None].repeat(1, 3)  # row g holds value g
    grid = torch.tensor([[1, 4, 4], [1, 4, 8], [1, 2, 2]])  # 4 + 8 + 1 cells
    objects = [[ParsedObject("", [0, 5], [0, 1], (0, 0))], [ParsedObject("", [0], [0], (0, 0))]]
    feats, lengths, _ = gather_object_prototypes(protos[:13], objects, grid, VRTCodec(V, 2), [0, 0, 1])
    assert feats[:, 0].tolist() == [0.0, 5.0, 12.0] and lengths == [2, 1]
    with pytest.raises(ValueError, match="row 1"):
        gather_object_prototypes(protos[:13], [[], [ParsedObject("", [1], [0], (0, 0))]], grid, VRTCodec(V, 2),
                                 [0, 0, 1])


def test_parse_vrt_into_completion_robustness(pp):
    wrapper = VisonTextProcessingClass(pp.processor, 2)
    wrapper.prepare(V)
    good = pp.encode('Found "a" <|VRT_1|><|VRT_2|> and "b" <|VRT_20|>.<|im_end|>')
    bad = pp.encode('Trunc "c" <|VRT_3|><|VRT_4')  # truncated inside a VRT string: the VRT id itself is complete
    T = max(len(good), len(bad))
    ids = torch.full((2, T), pp.tokenizer.pad_token_id)
    ids[0, : len(good)] = torch.tensor(good)
    ids[1, : len(bad)] = torch.tensor(bad)
    hs = torch.randn(2, T, 8)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])  # 4 cells each: <|VRT_20|> is outside
    with pytest.warns(UserWarning, match="outside"):
        out = parseVRTintoCompletion(wrapper, ids, hs, None, torch.randn(8, 8), grid)
    _, feats, labels, vrts, vrts_feats = out
    assert labels == [["a"], ["c"]] and vrts == [["<|VRT_1|><|VRT_2|>"], ["<|VRT_3|>"]]
    torch.testing.assert_close(feats[0][0], hs[0, [good.index(V + 1), good.index(V + 2)]])
    assert vrts_feats[1][0].shape == (1, 8)
    out = parseVRTintoCompletion(wrapper, ids, None)  # no hidden states, no prototypes
    assert out[1] == [[None, None], [None]] and out[4] == [[None, None], [None]]
    with pytest.warns(UserWarning, match="hidden states for 3 steps"):
        short = parseVRTintoCompletion(wrapper, ids, hs[:, :3])
    assert short[2] == [[], []]
