"""Fuzzing the packed checkpoint loader: a damaged folder is refused with a CheckpointError, never anything else.

A tiny checkpoint is exported once; each case copies it, damages one file with a seeded RNG (random bytes of a
weight file overwritten, flipped, cut or appended; config.json values changed, retyped, deleted, added, nested
or broken) and loads it. The only acceptable outcomes: :class:`CheckpointError`, a ``FileNotFoundError`` for a
deleted file, or a model whose logits equal the original's bit for bit (the damage hit bytes that carry no
meaning, e.g. zip padding, or a field the computation does not read). Any other exception type -- a raw
``KeyError``, ``struct.error``, ``UnicodeDecodeError``, ``RecursionError`` from deep inside a reader -- fails.

Counts (run in CI): :data:`BYTE_CASES` per weight file, :data:`HEADER_CASES` safetensors headers,
:data:`CONFIG_CASES` config.json mutations, plus the listed state-dict edits and per-field mutations.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from sensimix import SensiMixForSequenceClassification as Packed
from sensimix.checkpoint import WEIGHTS_BIN, WEIGHTS_SAFETENSORS, CheckpointError
from sensimix.export import export_checkpoint
from sensimix.qat import from_bert

BYTE_CASES = 120    # per weight file: model.safetensors and pytorch_model.bin
CONFIG_CASES = 200  # config.json mutations
HEADER_CASES = 60   # safetensors files with a lying JSON header
SEED = 20240508
GEOMETRY = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, intermediate_size=20,
                max_position_embeddings=12, type_vocab_size=2, num_hidden_layers=2)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """(a tiny exported checkpoint, its logits on a fixed batch)."""
    qat = from_bert(BertConfig(**GEOMETRY), num_hidden_layers=2, num_8bit_layers=1, seed=0)
    folder = export_checkpoint(qat, tmp_path_factory.mktemp("fuzz") / "ckpt")
    return folder, logits(Packed.from_pretrained(folder))


def logits(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, GEOMETRY["vocab_size"], (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=(torch.arange(10) >= 5).long().expand(3, -1)
                     ).logits


def check_outcome(folder: Path, reference: torch.Tensor, weights: str, case: str, *, deleted: bool = False) -> str:
    """Load ``folder``: 'refused' (CheckpointError), 'missing' (a deleted file) or 'same' (identical logits)."""
    try:
        model = Packed.from_pretrained(folder, weights=weights)
    except CheckpointError:
        return "refused"
    except FileNotFoundError:
        assert deleted, f"{case}: FileNotFoundError although no file was deleted"
        return "missing"
    except Exception as exc:  # noqa: BLE001 - the point of the test: no other exception type may escape
        pytest.fail(f"{case}: {type(exc).__name__} escaped instead of CheckpointError: {exc}")
    got = logits(model)
    assert torch.equal(got, reference), f"{case}: loaded, but the logits changed (max diff " \
                                        f"{(got - reference).abs().max().item():.3g})"
    return "same"


# ---------------------------------------------------------------------------------------------------
# weight files: random byte damage
# ---------------------------------------------------------------------------------------------------
def damage_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random damage: overwrite or flip a few bytes, cut the file, append junk, or zero a run of bytes.
    Half the hits land in the first 512 bytes, where the headers (safetensors JSON, zip local header) live."""
    n = len(data)
    pos = lambda: rng.randrange(min(n, 512)) if rng.random() < 0.5 else rng.randrange(n)  # noqa: E731
    kind = rng.choice(["overwrite", "flip", "truncate", "append", "zero-run"])
    buf = bytearray(data)
    if kind == "overwrite":
        for _ in range(rng.randint(1, 8)):
            buf[pos()] = rng.randrange(256)
    elif kind == "flip":
        i = pos()
        buf[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        buf = buf[:rng.randrange(n)]
    elif kind == "append":
        buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        i = pos()
        buf[i:i + rng.randint(1, 256)] = bytes(len(buf[i:i + 256]))[:len(buf[i:i + rng.randint(1, 256)])]
    return bytes(buf), kind


@pytest.mark.parametrize("weights", [WEIGHTS_SAFETENSORS, WEIGHTS_BIN])
def test_damaged_weight_file_is_refused_or_harmless(original, tmp_path, weights):
    folder, reference = original
    good = (folder / weights).read_bytes()
    rng = random.Random(f"{SEED}-{weights}")
    outcomes: dict[str, int] = {}
    for i in range(BYTE_CASES):
        case_dir = Path(shutil.copytree(folder, tmp_path / f"case{i}"))
        damaged, kind = damage_bytes(good, rng)
        (case_dir / weights).write_bytes(damaged)
        outcome = check_outcome(case_dir, reference, weights, f"{weights} case {i} ({kind})")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(case_dir)
    assert outcomes.get("refused", 0) >= BYTE_CASES // 2, outcomes  # the damage was real, not all no-ops


def damage_safetensors_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A well-formed safetensors file whose JSON header lies: a tensor's dtype, shape or offsets changed, a
    tensor dropped or duplicated under another name (the byte fuzz above rarely gets past the JSON parser)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(["dtype", "shape", "offsets", "drop", "duplicate", "metadata"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F64", "X"])
    elif kind == "shape":
        entry["shape"] = rng.choice([[], [0], list(reversed(entry["shape"])), [*entry["shape"], 1], [2**40],
                                     [-1] + entry["shape"][1:]])
    elif kind == "offsets":
        lo, hi = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[hi, lo], [lo, hi + 2], [lo - 1, hi - 1], [0, 0], [lo, 2**62]])
    elif kind == "drop":
        del header[name]
    elif kind == "duplicate":
        header[name + ".copy"] = dict(entry)
    else:
        header["__metadata__"] = rng.choice([{"format": "np"}, {"sensimix_format": "packed-v2"}, {"x": 1}, []])
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body + data[8 + size:], f"header {kind} of {name}"


def test_lying_safetensors_header_is_refused_or_harmless(original, tmp_path):
    folder, reference = original
    good = (folder / WEIGHTS_SAFETENSORS).read_bytes()
    rng = random.Random(f"{SEED}-header")
    case_dir = Path(shutil.copytree(folder, tmp_path / "case"))
    for i in range(HEADER_CASES):
        damaged, desc = damage_safetensors_header(good, rng)
        (case_dir / WEIGHTS_SAFETENSORS).write_bytes(damaged)
        check_outcome(case_dir, reference, WEIGHTS_SAFETENSORS, f"case {i} ({desc})")


# state-dict level edits, written back with the file's own writer: each must be a CheckpointError
STATE_EDITS: dict[str, Callable[[dict], None]] = {
    "tensor dropped": lambda s: s.pop(sorted(s)[0]),
    "tensor added": lambda s: s.update(extra=torch.zeros(2)),
    "tensor renamed": lambda s: s.update({"x." + sorted(s)[0]: s.pop(sorted(s)[0])}),
    "fp16 tensor as fp32": lambda s: s.update(classifier_bias_fp32(s)),
    "int8 indices as int16": lambda s: s.update({k: v.to(torch.int16) for k, v in s.items() if v.dtype == torch.int8}),
    "shape transposed": lambda s: s.update({k: v.t().contiguous() for k, v in s.items() if k.endswith("weight_q")}),
    "NaN in a bias": lambda s: s["classifier.bias"].fill_(float("nan")),
    "inf in a range": lambda s: s[next(k for k in s if k.endswith("weight_range"))].fill_(float("inf")),
    "range lo > hi": lambda s: s.update({k: v.flip(0) + torch.tensor([1.0, 0.0], dtype=v.dtype)
                                         for k, v in s.items() if k.endswith("weight_range")}),
    "one byte of sign bits": lambda s: s[next(k for k in s if k.endswith("weight_bits"))].view(-1)[0].add_(1),
}
BIN_ONLY_EDITS: dict[str, Callable[[dict], None]] = {  # what torch.load(weights_only=True) can still give back
    "sparse tensor": lambda s: s.update({"classifier.bias": s["classifier.bias"].to_sparse()}),
    "int instead of a tensor": lambda s: s.update({"classifier.bias": 3}),
    "nested dict": lambda s: s.update({"classifier.bias": {"t": s["classifier.bias"]}}),
    "list of tensors": lambda s: s.clear() or s.update({"state": [torch.zeros(1)]}),
    "non-string key": lambda s: s.update({3: torch.zeros(1)}),
}


def classifier_bias_fp32(s: dict) -> dict:
    return {"classifier.bias": s["classifier.bias"].float()}


def _write(path: Path, state: dict) -> None:
    if path.name == WEIGHTS_BIN:
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))


def _refused(folder: Path, weights: str, edit: Callable[[dict], None], tmp_path: Path) -> None:
    from sensimix.checkpoint import load_weight_file

    state = {k: v.clone() for k, v in load_weight_file(folder / weights).items()}
    edit(state)
    case_dir = Path(shutil.copytree(folder, tmp_path / "case"))
    _write(case_dir / weights, state)
    with pytest.raises(CheckpointError, match=weights.replace(".", r"\.")):
        Packed.from_pretrained(case_dir, weights=weights)


@pytest.mark.parametrize("edit", sorted(STATE_EDITS))
@pytest.mark.parametrize("weights", [WEIGHTS_SAFETENSORS, WEIGHTS_BIN])
def test_edited_state_dict_is_refused(original, tmp_path, weights, edit):
    _refused(original[0], weights, STATE_EDITS[edit], tmp_path)


@pytest.mark.parametrize("edit", sorted(BIN_ONLY_EDITS))
def test_odd_objects_in_pytorch_model_bin_are_refused(original, tmp_path, edit):
    _refused(original[0], WEIGHTS_BIN, BIN_ONLY_EDITS[edit], tmp_path)


def test_deleted_weight_file_is_file_not_found(original, tmp_path):
    folder, reference = original
    case_dir = Path(shutil.copytree(folder, tmp_path / "case"))
    for name in (WEIGHTS_SAFETENSORS, WEIGHTS_BIN):
        (case_dir / name).unlink()
        assert check_outcome(case_dir, reference, name, f"{name} deleted", deleted=True) == "missing"


# ---------------------------------------------------------------------------------------------------
# config.json: random field mutations and broken syntax
# ---------------------------------------------------------------------------------------------------
def random_value(rng: random.Random, depth: int = 0):
    """A JSON value of a random type, biased towards the edge cases a reader trips on."""
    kind = rng.choice(["int", "edge-int", "float", "edge-float", "str", "bool", "null", "list", "dict"])
    if kind == "int":
        return rng.randint(-10, 100)
    if kind == "edge-int":
        return rng.choice([0, -1, 1, 2, 2**31, 2**63, 10**30, -(10**30)])
    if kind == "float":
        return rng.uniform(-2, 2)
    if kind == "edge-float":
        return rng.choice([0.0, -0.0, 1e-300, 1e300, float("nan"), float("inf"), -float("inf"), 0.5, 1.0])
    if kind == "str":
        return rng.choice(["", "gelu", "relu", "absolute", "packed-v1", "big", "x" * 1000, "\u00e9\u0000", "3"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if depth > 2:
        return []
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {str(random_value(rng, depth + 1))[:20]: random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def mutate_config(raw: dict, text: str, rng: random.Random) -> tuple[str, str]:
    """(new config.json text, description) after one random mutation."""
    keys = sorted(raw)
    kind = rng.choice(["value", "value", "value", "retype", "delete", "add", "syntax", "nest", "top-level"])
    c = dict(raw)
    if kind == "value":  # a plausible value of the same type, or an edge case
        key = rng.choice(keys)
        old = c[key]
        if isinstance(old, bool) or not isinstance(old, (int, float)):
            c[key] = random_value(rng)
        else:
            c[key] = rng.choice([old + 1, old - 1, 0, -old, old * 1000, type(old)(1), float("nan")])
        desc = f"{key}: {old!r} -> {c[key]!r}"
    elif kind == "retype":
        key = rng.choice(keys)
        c[key] = rng.choice([str(c[key]), [c[key]], {"v": c[key]}, None, True])
        desc = f"{key} retyped to {type(c[key]).__name__}"
    elif kind == "delete":
        key = rng.choice(keys)
        del c[key]
        desc = f"{key} deleted"
    elif kind == "add":
        key = rng.choice(["extra", "num_labels", "problem_type", "torch_dtype", "dtype", "auto_map", "quantization_config",
                          "_attn_implementation", "return_dict", "id2label", "model_type", "architectures"])
        c[key] = random_value(rng)
        desc = f"{key} added as {c[key]!r}"[:200]
    elif kind == "nest":
        key = rng.choice(keys)
        depth = rng.choice([50, 500, 5000, 100_000])
        body = json.dumps(c)[:-1] + f', "{key}": {nested(depth)}}}'
        return body, f"{key} nested {depth} deep"
    elif kind == "top-level":
        return rng.choice(["[]", "null", "3", '"config"', "[" + text + "]"]), "not an object"
    else:
        cut = rng.randrange(len(text))
        broken = rng.choice([text[:cut], text[:cut] + rng.choice(["{", "}", ",", "\"", "\\", "\x00", "\ufffd"])
                             + text[cut:]])
        return broken, f"syntax broken at char {cut}"
    return json.dumps(c), desc


def test_mutated_config_is_refused_or_harmless(original, tmp_path):
    folder, reference = original
    text = (folder / "config.json").read_text()
    raw = json.loads(text)
    rng = random.Random(SEED)
    case_dir = Path(shutil.copytree(folder, tmp_path / "case"))
    outcomes: dict[str, int] = {}
    for i in range(CONFIG_CASES):
        body, desc = mutate_config(raw, text, rng)
        (case_dir / "config.json").write_text(body)
        outcome = check_outcome(case_dir, reference, "auto", f"config.json case {i} ({desc})")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("refused", 0) >= CONFIG_CASES // 2, outcomes


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_8bit_layers", "layer_norm_eps",
                                   "hidden_act", "vocab_size", "num_attention_heads"])
@pytest.mark.parametrize("mutation", [lambda v: None, lambda v: f"{v}0", lambda v: [v], lambda v: -1,
                                      lambda v: 10**12, lambda v: float("nan")],
                         ids=["null", "str", "list", "negative", "huge", "nan"])
def test_each_model_field_mutation_is_refused(original, tmp_path, field: str, mutation: Callable):
    """The fields that shape the computation: every retyped or out-of-range value is a CheckpointError."""
    folder, reference = original
    case_dir = Path(shutil.copytree(folder, tmp_path / "case"))
    raw = json.loads((folder / "config.json").read_text())
    raw[field] = mutation(raw[field])
    (case_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="config.json"):
        Packed.from_pretrained(case_dir)


# ---------------------------------------------------------------------------------------------------
# hostile or incomplete folders: a pickle that runs code, a BERT folder without a tokenizer
# ---------------------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this would create the file named ``marker``: weights_only=True must refuse it unrun."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_poisoned_pickle_in_a_packed_folder_is_refused_unrun(original, tmp_path):
    folder, _ = original
    case_dir = Path(shutil.copytree(folder, tmp_path / "case"))
    torch.save({"classifier.bias": RunsCode(tmp_path / "ran")}, case_dir / WEIGHTS_BIN)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load it with torch.load\\(weights_only=True"):
        Packed.from_pretrained(case_dir, weights=WEIGHTS_BIN)
    assert not (tmp_path / "ran").exists()


def test_a_poisoned_pickle_in_a_bert_folder_is_one_source_error_unrun(tiny_bert_dir, tmp_path):
    from sensimix.qat import from_bert as build
    from sensimix.sources import SourceError, load_bert_classifier

    bert = Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))
    (bert / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": RunsCode(tmp_path / "ran")}, bert / WEIGHTS_BIN)
    with pytest.raises(SourceError, match="pytorch_model.bin cannot be loaded safely"):
        load_bert_classifier(bert, 2)
    with pytest.raises(SourceError, match="pytorch_model.bin cannot be loaded safely"):  # the one wording
        build(bert, num_hidden_layers=2, num_8bit_layers=1)
    assert not (tmp_path / "ran").exists()


def test_a_model_folder_without_tokenizer_files_is_named(tiny_bert_dir, tmp_path):
    from sensimix.sources import SourceError, load_tokenizer

    bert = Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bert / name).unlink(missing_ok=True)
    with pytest.raises(SourceError, match="has no tokenizer files .*copy them from the BERT .*--tokenizer"):
        load_tokenizer(bert)
