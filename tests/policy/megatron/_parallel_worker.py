"""Worker for test_parallel.py, run by ``torch.distributed.run --nproc-per-node 2``.

Usage: ``_parallel_worker.py --tp T --pp P --out result.json``. Every rank builds the same tiny
HF models (same seeds), its megatron stage, loads its shards and compares with HF:

- TP: logits gathered over TP (plain and a packed row of two documents), max abs diff.
- PP: a forward through ``get_forward_backward_func()(forward_only=True)`` over two
  micro-batches; the last stage compares the logits it receives.
- both: ``gather_hf_weights`` must give back the HF tensors bit-exactly on every rank.

Rank 0 writes ``{"cases": [{"model", "backend", "rank", "logits_diff", "packed_diff",
"gather_exact"}, ...]}`` gathered from all ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _megatron_tiny import packed_row, tiny_hf_model  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from fastmath_nemo.batching.documents import blocked_attention as megatron_attention_mask  # noqa: E402
from fastmath_nemo.policy.megatron.config import transformer_config_from_hf  # noqa: E402
from fastmath_nemo.policy.megatron.layer_spec import gpt_layer_spec  # noqa: E402
from fastmath_nemo.policy.megatron.convert import gather_hf_weights  # noqa: E402
from fastmath_nemo.policy.megatron.model import (  # noqa: E402
    build_gpt_model,
    load_hf_weights,
)
from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel, init_model_parallel  # noqa: E402

CASES = [("qwen2", "sdpa"), ("qwen3", "unfused"), ("llama", "sdpa")]


def hf_reference(hf, ids: torch.Tensor, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF logits for ``ids`` [B, S], and for the packed row run document by document."""
    with torch.no_grad():
        plain = hf(ids).logits
        docs = [hf(ids[:1, doc_ids[0] == d]).logits for d in doc_ids[0].unique()]
    return plain, torch.cat(docs, dim=1)


def run_tp(model, hf, ids, doc_ids, position_ids) -> dict:
    """TP only: call the model directly, logits gathered over the TP group."""
    plain_ref, packed_ref = hf_reference(hf, ids, doc_ids)
    with torch.no_grad():
        plain = model(ids, position_ids, None, runtime_gather_output=True)
        mask = megatron_attention_mask(doc_ids)
        packed = model(ids[:1], packed_position_ids(doc_ids), mask, runtime_gather_output=True)
    return {
        "logits_diff": (plain - plain_ref).abs().max().item(),
        "packed_diff": (packed - packed_ref).abs().max().item(),
    }


def packed_position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 for each document of the row: [1, S]."""
    pos = torch.zeros_like(doc_ids)
    for d in doc_ids[0].unique():
        where = doc_ids[0] == d
        pos[0, where] = torch.arange(int(where.sum()))
    return pos


def run_pp(model, hf, ids, doc_ids, position_ids) -> dict:
    """PP: the schedule runs two micro-batches (plain rows, then the packed row duplicated)."""
    plain_ref, packed_ref = hf_reference(hf, ids, doc_ids)
    packed_ids = ids[:1].expand_as(ids)
    micro_batches = [
        {"ids": ids, "pos": position_ids, "mask": None},
        {"ids": packed_ids, "pos": packed_position_ids(doc_ids).expand_as(ids),
         "mask": megatron_attention_mask(doc_ids).expand(ids.size(0), -1, -1, -1)},
    ]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch["ids"], batch["pos"], batch["mask"], runtime_gather_output=True)

        def keep_logits(output: torch.Tensor):
            return output.sum() * 0.0, {"logits": output.detach()}

        return logits, keep_logits

    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=ids.size(1),
            micro_batch_size=ids.size(0),
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        assert store == [] or store == {}, store
        return {"logits_diff": None, "packed_diff": None}
    plain, packed = (item["logits"] for item in store)
    return {
        "logits_diff": (plain - plain_ref).abs().max().item(),
        "packed_diff": (packed[:1] - packed_ref).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_model_parallel(args.tp, args.pp, seed=1234)
    results = []
    for model_type, backend in CASES:
        hf = tiny_hf_model(model_type)
        cfg = hf.config
        tcfg = transformer_config_from_hf(cfg, tp=args.tp, pp=args.pp)
        model = build_gpt_model(cfg, tcfg, gpt_layer_spec(backend, tcfg.qk_layernorm)).eval()
        load_hf_weights(model, hf.state_dict(), cfg)
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
        position_ids = torch.arange(ids.size(1)).expand_as(ids)
        doc_ids = packed_row(ids.size(1))
        run = run_pp if args.pp > 1 else run_tp
        row = {"model": model_type, "backend": backend, "rank": dist.get_rank(),
               **run(model, hf, ids, doc_ids, position_ids)}
        reference = dict(hf.state_dict())
        if cfg.tie_word_embeddings:
            del reference["lm_head.weight"]
        gathered = dict(gather_hf_weights(model, cfg))
        row["gather_exact"] = gathered.keys() == reference.keys() and all(
            torch.equal(gathered[k], reference[k]) for k in reference
        )
        results.append(row)
    everything: list = [None] * dist.get_world_size()
    dist.all_gather_object(everything, results)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"cases": [r for rows in everything for r in rows]}, indent=1))
    destroy_model_parallel()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
