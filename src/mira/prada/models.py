"""The experiment's two models: a larger target and a smaller proxy with one tokenizer.

Both start from one small pretrained Llama (stories260K: hidden 64, 5 layers, vocabulary
512, trained on TinyStories), so they share its tokenizer exactly:

* **target**: ``grow_llama`` makes a deeper model with wider MLPs that computes *exactly*
  the source's function at first. Source layer ``i`` goes to slot ``round(i * L / 5)``;
  the other slots are copies of the previous source layer whose output projections
  (``o_proj`` and ``down_proj``) are zero, so they add nothing to the residual stream;
  extra MLP units get random input weights and zero output weights. Then every parameter
  is pre-trained on TinyStories text plus general instruction data (Dolly).
* **proxy**: the source model itself, given a shorter pass of the same pre-training, so
  that it too knows the instruction format. It is strictly smaller than the target.

``build_models`` writes ``OUT/target``, ``OUT/proxy`` (Hugging Face folders with the
tokenizer) and ``OUT/build.json`` (sizes, steps, wall and CPU seconds, held-out losses before/after).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mira.data.prompts import TokenizedDataset, collate, tokenize_records
from mira.data.records import Record
from mira.errors import MiraError
from mira.io import atomic_dir, atomic_write_json
from mira.train.trainer import batch_indices

Log = Callable[[str], None]


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- growing a model without changing its function ------------------------------------------
def grow_llama(src, layers: int, intermediate_size: int, seed: int = 0):
    """A ``layers``-deep copy of the Llama ``src`` with MLP width ``intermediate_size`` and the same outputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_src = src.config.num_hidden_layers
    width_src = src.config.intermediate_size
    if layers < n_src or intermediate_size < width_src:
        raise MiraError(f"the target must be at least as large as the source ({n_src} layers, MLP {width_src}); "
                        f"got {layers} layers, MLP {intermediate_size}", where="target size")
    cfg = LlamaConfig(**{**src.config.to_dict(), "num_hidden_layers": layers, "intermediate_size": intermediate_size})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    slot_of = {round(i * layers / n_src): i for i in range(n_src)}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(src.model.embed_tokens.weight)
        model.model.norm.weight.copy_(src.model.norm.weight)
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(src.lm_head.weight)
        source = 0
        for slot, layer in enumerate(model.model.layers):
            source = slot_of.get(slot, source)
            old = src.model.layers[source]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.copy_(getattr(old.self_attn, name).weight)
            layer.input_layernorm.weight.copy_(old.input_layernorm.weight)
            layer.post_attention_layernorm.weight.copy_(old.post_attention_layernorm.weight)
            layer.mlp.gate_proj.weight[:width_src].copy_(old.mlp.gate_proj.weight)
            layer.mlp.up_proj.weight[:width_src].copy_(old.mlp.up_proj.weight)
            layer.mlp.down_proj.weight.zero_()
            if slot in slot_of:  # a source layer: its own MLP, extra units silent
                layer.mlp.down_proj.weight[:, :width_src].copy_(old.mlp.down_proj.weight)
            else:  # a new layer: the identity on the residual stream
                layer.self_attn.o_proj.weight.zero_()
    return model.eval()


# -- pre-training data ------------------------------------------------------------------------
def read_stories(path: str | Path) -> list[str]:
    """TinyStories text: stories separated by blank lines."""
    p = Path(path)
    if not p.is_file():
        raise MiraError(f"not found: {path}", where="--stories")
    from mira.userfiles import read_text

    return [s.strip() for s in read_text(p, "TinyStories text file", where="--stories").split("\n\n") if s.strip()]


def text_dataset(texts: list[str], tokenizer, max_length: int) -> TokenizedDataset:
    """Plain language modelling: ``BOS text EOS``, loss on every token, cut at ``max_length``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ds = TokenizedDataset([], [], [], [])
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = (bos + ids + eos)[:max_length]
        ds.input_ids.append(ids)
        ds.labels.append(list(ids))
        ds.prompt_lens.append(0)
    return ds


def load_dolly(path: str | Path, exclude: tuple[str, ...] = ()) -> list[Record]:
    from mira.config import DataConfig
    from mira.data.records import load_records

    try:
        records = load_records(DataConfig(source="dolly", path=str(path), max_per_task=None))
    except MiraError as e:  # the file is --dolly here, not data.path
        raise MiraError(e.message, where="--dolly" if e.where == "data.path" else e.where) from None
    return [r for r in records if r.task not in set(exclude)]


@dataclass
class PretrainSettings:
    steps: int
    lr: float
    batch_size: int = 8
    warmup: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


def pack(ds: TokenizedDataset, max_length: int) -> TokenizedDataset:
    """The examples' tokens end to end, cut into blocks of ``max_length`` (no padding), the
    loss on every token: a distillation stream, where every position carries signal."""
    stream = [t for ids in ds.input_ids for t in ids]
    out = TokenizedDataset([], [], [], [])
    for start in range(0, len(stream) - 1, max_length):
        block = stream[start:start + max_length]
        if len(block) < 2:
            break
        out.input_ids.append(block)
        out.labels.append(list(block))
        out.prompt_lens.append(0)
    return out


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over attended positions of KL(teacher || student) of the next-token distributions."""
    keep = attention_mask.bool()
    s = torch.log_softmax(student_logits[keep].float(), dim=-1)
    t = torch.log_softmax(teacher_logits[keep].float(), dim=-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def pretrain(model, ds: TokenizedDataset, pad_id: int, settings: PretrainSettings, seed: int = 0,
             log: Log | None = None, name: str = "model", teacher=None) -> list[float]:
    """Full-parameter AdamW with a one-cycle schedule; returns the per-step losses.

    With ``teacher`` (a model with the same vocabulary), the loss is ``distillation_loss``
    against the teacher's next-token distributions instead of the labels' cross-entropy."""
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps,
                                                pct_start=settings.warmup)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step, idx in enumerate(batch_indices(len(ds), settings.batch_size, settings.steps, seed)):
        batch = collate(ds, idx, pad_id)
        if teacher is None:
            loss = model(**batch).loss
        else:
            with torch.no_grad():
                z_teacher = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = distillation_loss(z, z_teacher, batch["attention_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, settings.steps // 5) == 0:
            recent = losses[-max(1, settings.steps // 5):]
            log(f"pre-training {name}: step {step + 1}/{settings.steps}, loss {sum(recent) / len(recent):.3f}, "
                f"{time.perf_counter() - t0:.0f}s")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


# -- the whole build ------------------------------------------------------------------------------
@dataclass
class BuildSettings:
    target_layers: int = 10
    target_intermediate: int = 344
    target: PretrainSettings = field(default_factory=lambda: PretrainSettings(steps=200, lr=2e-3))
    proxy: PretrainSettings = field(default_factory=lambda: PretrainSettings(steps=100, lr=1e-3))
    max_length: int = 256
    max_stories: int = 2000
    max_dolly: int = 2000
    heldout: int = 48  # held-out stories and Dolly records each, for the before/after losses
    exclude_categories: tuple[str, ...] = ()
    seed: int = 0


def _heldout_losses(model, sets: dict[str, TokenizedDataset], pad_id: int) -> dict[str, float]:
    from mira.eval.metrics import eval_loss

    return {name: round(eval_loss(model, ds, pad_id)[0], 4) for name, ds in sets.items()}


def _save(model, tokenizer, out: Path) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def build_models(source_dir: str, stories_path: str, dolly_path: str, out_dir: str | Path,
                 settings: BuildSettings | None = None, log: Log = print) -> dict:
    """Build, pre-train and save ``OUT/target`` and ``OUT/proxy``; return (and save) the report."""
    from transformers import AutoModelForCausalLM

    from mira.models.loader import load_tokenizer

    settings = settings or BuildSettings()

    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    if not Path(source_dir).exists():
        raise MiraError(f"model folder not found: {source_dir}", where="--source")
    if not (Path(source_dir) / "config.json").is_file():
        raise MiraError(f"{source_dir} is not a Hugging Face model folder (no config.json)", where="--source")
    tokenizer = load_tokenizer(str(source_dir), where="--source")
    pad_id = tokenizer.pad_token_id

    rng = random.Random(settings.seed)
    stories = read_stories(stories_path)
    dolly = load_dolly(dolly_path, settings.exclude_categories)
    rng.shuffle(stories)
    rng.shuffle(dolly)
    h = settings.heldout
    heldout = {"stories": text_dataset(stories[:h], tokenizer, settings.max_length),
               "dolly": tokenize_records(dolly[:h], tokenizer, settings.max_length)}
    train = TokenizedDataset.concat([text_dataset(stories[h:h + settings.max_stories], tokenizer, settings.max_length),
                                     tokenize_records(dolly[h:h + settings.max_dolly], tokenizer, settings.max_length)])
    log(f"pre-training data: {min(len(stories) - h, settings.max_stories)} TinyStories stories + "
        f"{min(len(dolly) - h, settings.max_dolly)} Dolly records ({sum(len(x) for x in train.input_ids):,} tokens)")

    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    report: dict = {"source": str(source_dir), "settings": asdict(settings),
                    "train_examples": len(train), "train_tokens": sum(len(x) for x in train.input_ids)}
    for name in ("target", "proxy"):
        t0, cpu0 = time.perf_counter(), time.process_time()
        if name == "target":
            model = grow_llama(source, settings.target_layers, settings.target_intermediate, seed=settings.seed)
        else:
            model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
        before = _heldout_losses(model, heldout, pad_id)
        pre = getattr(settings, name)
        losses = pretrain(model, train, pad_id, pre, seed=settings.seed, log=log, name=name)
        after = _heldout_losses(model, heldout, pad_id)
        _save(model, tokenizer, out / name)
        seconds = time.perf_counter() - t0
        report[name] = {"parameters": num_params(model), "layers": model.config.num_hidden_layers,
                        "hidden": model.config.hidden_size, "intermediate": model.config.intermediate_size,
                        "pretrain": pre.to_dict(), "first_loss": round(losses[0], 4),
                        "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
                        "heldout_loss_before": before, "heldout_loss_after": after, "seconds": round(seconds, 1),
                        "cpu_seconds": round(time.process_time() - cpu0, 1)}
        log(f"{name}: {num_params(model):,} parameters, held-out loss {before} -> {after}, {seconds:.0f}s")
    if report["proxy"]["parameters"] >= report["target"]["parameters"]:
        raise MiraError("the proxy must be strictly smaller than the target", where="target size")
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    atomic_write_json(out / "build.json", report)
    return report


# -- a proxy cut out of the target: same tokenizer, fewer layers ------------------------------
def shrink_llama(src, keep_first: int, keep_last: int = 1):
    """A copy of the Llama ``src`` with only its first ``keep_first`` and last ``keep_last``
    decoder layers (embeddings, final norm and head unchanged), so that it shares the
    tokenizer and vocabulary. Its function is *not* the source's: the dropped layers are gone."""
    n = src.config.num_hidden_layers
    if keep_first < 0 or keep_last < 0 or keep_first + keep_last < 1 or keep_first + keep_last >= n:
        raise MiraError(f"keep 1 to {n - 1} of the {n} layers in all; got first {keep_first}, last {keep_last}",
                        where="--keep-first")
    return select_layers(src, list(range(keep_first)) + list(range(n - keep_last, n)))


def select_layers(src, kept: list[int]):
    """A copy of the Llama ``src`` with only the decoder layers ``kept`` (source indices, in
    order, each once), renumbered for the KV cache; embeddings, final norm and head unchanged."""
    import copy

    n = src.config.num_hidden_layers
    if not kept or len(kept) >= n or sorted(set(kept)) != list(kept) or kept[0] < 0 or kept[-1] >= n:
        raise MiraError(f"keep an increasing list of 1 to {n - 1} distinct layers out of 0..{n - 1}, got {kept}",
                        where="--keep-layers")
    model = copy.deepcopy(src)
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in kept])
    for slot, layer in enumerate(model.model.layers):  # the KV cache indexes layers by this
        layer.self_attn.layer_idx = slot
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    return model.eval()


def write_shrunk_proxy(source: str, out_dir: str | Path, keep_first: int, keep_last: int = 1,
                       dtype: str = "float32", heal_records: list[Record] | None = None,
                       heal: PretrainSettings | None = None, max_length: int = 256, heldout: int = 16,
                       seed: int = 0, log: Log | None = None, distill: bool = False,
                       keep_layers: list[int] | None = None) -> dict:
    """``shrink_llama`` of ``source`` (a folder or an alias such as ``smollm2-135m-instruct``),
    saved with its tokenizer as a Hugging Face folder; returns (and writes) ``shrink.json``.

    With ``heal_records`` and ``heal``, the shrunk model is first given a short full-parameter
    pass (``pretrain``, loss on the responses) on those *public* records, so that the proxy
    base is a working language model again; the held-out loss before and after is reported.
    With ``distill``, the pass distils the source instead: KL(source || proxy) on every token
    of the records packed into ``max_length`` blocks (prompts included), which carries far more
    signal per step than the responses' cross-entropy. ``keep_layers`` (source layer indices)
    replaces ``keep_first``/``keep_last``."""
    from mira.models.loader import load_base

    t0 = time.perf_counter()
    src, tokenizer = load_base(source, dtype=dtype, device="cpu", where="--source")
    if getattr(src.config, "model_type", None) != "llama":
        raise MiraError(f"only Llama models can be shrunk, got {src.config.model_type!r}", where="--source")
    n_src = src.config.num_hidden_layers
    kept = keep_layers if keep_layers is not None else list(range(keep_first)) + list(range(n_src - keep_last, n_src))
    model = select_layers(src, kept)
    report = {"source": str(source), "source_layers": n_src, "kept_layers": kept,
              "source_parameters": num_params(src), "parameters": num_params(model)}
    if heal_records and heal is not None:
        records = list(heal_records)
        random.Random(seed).shuffle(records)
        held = tokenize_records(records[:heldout], tokenizer, max_length)
        train = tokenize_records(records[heldout:], tokenizer, max_length)
        sets = {"heldout": held}
        if not len(train):
            raise MiraError(f"no healing record fits {max_length} tokens ({len(records) - heldout} tried)",
                            where="--max-length")
        if distill:
            train = pack(train, max_length)
        report["heal"] = {"settings": heal.to_dict(), "mode": "distill" if distill else "cross-entropy",
                          "records": len(records) - len(held), "train_sequences": len(train),
                          "train_tokens": sum(len(x) for x in train.input_ids), "heldout_records": len(held),
                          "source_heldout_loss": _heldout_losses(src, sets, tokenizer.pad_token_id)["heldout"],
                          "heldout_loss_before": _heldout_losses(model, sets, tokenizer.pad_token_id)["heldout"]}
        teacher = src if distill else None  # the source is needed during healing only as the teacher
        del src
        t1 = time.perf_counter()
        losses = pretrain(model, train, tokenizer.pad_token_id, heal, seed=seed, log=log, name="proxy",
                          teacher=teacher)
        del teacher
        report["heal"].update(heldout_loss_after=_heldout_losses(model, sets, tokenizer.pad_token_id)["heldout"],
                              first_loss=round(losses[0], 4), last_loss=round(sum(losses[-5:]) / len(losses[-5:]), 4),
                              seconds=round(time.perf_counter() - t1, 1))
        if log:
            h = report["heal"]
            log(f"healed: held-out loss {h['heldout_loss_before']} -> {h['heldout_loss_after']} "
                f"(source {h['source_heldout_loss']}) in {h['seconds']:.0f}s")
    out = Path(out_dir)
    _save(model, tokenizer, out)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "shrink.json", report)
    if log:
        log(f"proxy: {report['parameters']:,} of {report['source_parameters']:,} parameters, "
            f"layers {report['kept_layers']} -> {out}")
    return report
