"""TGIS logits processing and sampling against transformers' processors, token choice and token details."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from services.common.protocol import GenerateRequest, LogitsParams, StopParams, token_ids
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.sampling import BatchParams, choose, input_details, make_generator, process, token_detail
from tests.local_engine import LocalEngine

CPU = torch.device("cpu")
VOCAB = 500
EOS = 2

# (params, tokens generated so far) per row: every processor, alone and combined, greedy rows among them.
ROWS = [
    (LogitsParams(repetition_penalty=1.3, min_new_tokens=3), 1),
    (LogitsParams(temperature=0.7, top_k=10, seed=1), 0),
    (LogitsParams(temperature=1.0, top_p=0.8, repetition_penalty=1.2, seed=2), 3),
    (LogitsParams(temperature=1.5, typical_p=0.6, seed=3), 2),
    (LogitsParams(temperature=0.9, top_k=40, top_p=0.9, typical_p=0.95, length_penalty_start=2,
                  length_penalty_decay=1.5, seed=4), 6),
    (LogitsParams(temperature=2.0, top_k=1000, seed=5), 0),
    (LogitsParams(length_penalty_start=1, length_penalty_decay=0.8, repetition_penalty=0.7), 4),
    (LogitsParams(temperature=1.0, seed=6), 0),
]


def _reference_row(params: LogitsParams, scores: torch.Tensor, generated: int, ids: list[int],
                   pad_id: int) -> torch.Tensor:
    """One row through TGIS's rules and transformers' own processors."""
    s = scores.clone()[None]
    if generated < params.min_new_tokens:
        s[0, EOS] = -math.inf
    elif params.length_penalty_decay != 0 and generated - params.length_penalty_start > 0:
        s[0, EOS] += s[0, EOS].abs() * (params.length_penalty_decay ** (generated - params.length_penalty_start) - 1)
    if params.repetition_penalty != 1.0:
        eos_score = s[0, EOS].clone()
        s = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(torch.tensor([ids]), s)
        if pad_id == EOS:
            s[0, EOS] = eos_score
    if params.sampling:
        warpers = [TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else []
        warpers += [TopKLogitsWarper(params.top_k)] if params.top_k else []
        warpers += [TopPLogitsWarper(params.top_p)] if params.top_p < 1.0 else []
        warpers += [TypicalLogitsWarper(params.typical_p)] if 0 < params.typical_p < 1 else []
        for warper in warpers:
            s = warper(None, s)
    return s[0]


def _batch(rows, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(len(rows), VOCAB, generator=gen) * 1.5
    ids = [torch.randint(0, VOCAB, (12,), generator=gen).tolist() + [EOS] for _ in rows]
    seen = torch.zeros(len(rows), VOCAB, dtype=torch.bool)
    for row, row_ids in enumerate(ids):
        seen[row, row_ids] = True
    generated = torch.tensor([g for _, g in rows])
    return scores, ids, seen, generated


@pytest.mark.parametrize("pad_id", [EOS, 0], ids=["pad-is-eos", "pad-differs"])
def test_processing_matches_transformers_per_row(pad_id):
    scores, ids, seen, generated = _batch(ROWS)
    params = [p for p, _ in ROWS]
    out = process(scores.clone(), BatchParams.build(params, CPU), generated, seen, EOS, pad_id)
    for row, (p, g) in enumerate(ROWS):
        expected = _reference_row(p, scores[row], g, ids[row], pad_id)
        torch.testing.assert_close(out[row], expected, rtol=1e-6, atol=1e-6, msg=f"row {row}")
    assert out[0, EOS] == -math.inf  # min_new_tokens not reached


def test_greedy_rows_do_not_depend_on_sampling_rows():
    scores, _, seen, generated = _batch(ROWS)
    params = [p for p, _ in ROWS]
    mixed = process(scores.clone(), BatchParams.build(params, CPU), generated, seen, EOS, EOS)
    greedy_rows = [0, 6]
    alone = process(scores[greedy_rows].clone(), BatchParams.build([params[r] for r in greedy_rows], CPU),
                    generated[greedy_rows], seen[greedy_rows], EOS, EOS)
    assert torch.equal(mixed[greedy_rows], alone)


def test_greedy_ties_pick_lowest_id():
    scores = torch.zeros(1, VOCAB)
    scores[0, [7, 3, 11]] = 5.0
    assert choose(scores, BatchParams.build([LogitsParams()], CPU), [None]).tolist() == [3]


def _sample(rows: list[LogitsParams], scores: torch.Tensor, steps: int) -> list[list[int]]:
    generators = [make_generator(p, CPU) for p in rows]
    batch = BatchParams.build(rows, CPU)
    generated = torch.zeros(len(rows), dtype=torch.long)
    seen = torch.zeros(len(rows), VOCAB, dtype=torch.bool)
    return [choose(process(scores.clone(), batch, generated, seen, EOS, EOS), batch, generators).tolist()
            for _ in range(steps)]


def test_seeded_sampling_is_reproducible_and_batch_invariant():
    mine = LogitsParams(temperature=1.2, top_k=50, seed=1234)
    scores = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    alone = [tokens[0] for tokens in _sample([mine], scores, 20)]
    assert alone == [tokens[0] for tokens in _sample([mine], scores, 20)]
    assert len(set(alone)) > 1  # it really samples
    others = [LogitsParams(), LogitsParams(temperature=0.8, seed=99)]
    batch_scores = torch.cat([torch.randn(2, VOCAB), scores])
    assert [tokens[2] for tokens in _sample([*others, mine], batch_scores, 20)] == alone
    other_seed = LogitsParams(temperature=1.2, top_k=50, seed=4321)
    assert [tokens[0] for tokens in _sample([other_seed], scores, 20)] != alone


def test_sampling_never_picks_filtered_tokens():
    scores = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4))
    allowed = set(scores[0].topk(3).indices.tolist())
    picks = {tokens[0] for tokens in _sample([LogitsParams(temperature=5.0, top_k=3, seed=7)], scores, 60)}
    assert picks == allowed


def test_engine_seeded_request_is_batch_invariant(tiny_model_path):
    engine = Engine(WorkerConfig(model_name=str(tiny_model_path), device="cpu", kv_cache_memory="64MiB"))
    mine = LogitsParams(temperature=1.0, top_k=20, seed=42)

    def request(rid: str, ids: list[int], params: LogitsParams, max_new: int) -> GenerateRequest:
        return GenerateRequest(rid, token_ids(ids), params, StopParams(max_new, max_new), 0.0)

    engine.reset()
    local = LocalEngine(engine)
    local.batcher.submit(b"t", [request("mine", [5, 6, 7], mine, 9)])
    alone = local.run({})["mine"]
    engine.reset()
    crowded = LocalEngine(engine, max_waiting_tokens=1)
    crowded.batcher.submit(b"t", [request("other", [9, 9, 9, 9], LogitsParams(temperature=0.7, seed=1), 3)])
    got: dict[str, list[int]] = {}
    crowded.step_once(got)  # "other" starts alone; "mine" and a greedy one join later
    crowded.batcher.submit(b"t", [request("greedy", [1], LogitsParams(), 9), request("mine", [5, 6, 7], mine, 9)])
    assert crowded.run(got)["mine"] == alone


def _details_params(**kwargs) -> LogitsParams:
    return LogitsParams(generated_details=True, **kwargs)


def test_generated_logprob_and_rank():
    scores = torch.tensor([1.0, 5.0, 3.0, 5.0, 2.0])
    detail = token_detail(_details_params(token_logprobs=True, token_ranks=True), scores, 2)
    assert detail.rank == 3  # two tokens score strictly higher
    assert detail.logprob == pytest.approx(torch.log_softmax(scores, -1)[2].item())
    assert token_detail(LogitsParams(token_logprobs=True), scores, 2).logprob == 0.0  # generated details off
    plain = token_detail(_details_params(), scores, 2)
    assert (plain.logprob, plain.rank, list(plain.top_ids)) == (0.0, 0, [])


def test_top_k_one_sampling_has_logprob_zero():
    params = _details_params(temperature=0.5, top_k=1, seed=3, token_logprobs=True, token_ranks=True)
    scores = torch.randn(1, VOCAB)
    batch = BatchParams.build([params], CPU)
    processed = process(scores.clone(), batch, torch.zeros(1, dtype=torch.long),
                        torch.zeros(1, VOCAB, dtype=torch.bool), EOS, EOS)
    token = choose(processed, batch, [make_generator(params, CPU)]).item()
    assert token == scores.argmax().item()
    detail = token_detail(params, processed[0], token)
    assert (detail.logprob, detail.rank) == (0.0, 1)


def test_top_n_ties_and_ordering():
    scores = torch.tensor([3.0, 3.0, 4.0, 1.0, 4.0, 0.0])
    with_lp = token_detail(_details_params(token_logprobs=True, top_n_tokens=3), scores, 2)
    assert list(with_lp.top_ids) == [2, 4, 0, 1]  # ties at the 3rd score give 4; equal logprobs: lower id first
    assert with_lp.top_logprobs == pytest.approx(torch.log_softmax(scores, -1)[[2, 4, 0, 1]].tolist())
    ids_only = token_detail(_details_params(top_n_tokens=3), scores, 2)
    assert (list(ids_only.top_ids), ids_only.top_logprobs) == ([0, 1, 2, 4], [])


def test_top_n_is_capped_at_four_n_and_skips_filtered_tokens():
    capped = token_detail(_details_params(token_logprobs=True, top_n_tokens=1), torch.zeros(10), 0)
    assert list(capped.top_ids) == [0, 1, 2, 3]  # the cap keeps the lowest ids among the ties
    filtered = torch.full((10,), -math.inf)
    filtered[[6, 8]] = torch.tensor([1.0, 2.0])
    detail = token_detail(_details_params(token_logprobs=True, top_n_tokens=5), filtered, 8)
    assert list(detail.top_ids) == [8, 6]
    too_many = token_detail(_details_params(top_n_tokens=VOCAB * 2), torch.arange(6.0), 5)
    assert list(too_many.top_ids) == list(range(6))


def test_input_details():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([11, 22, 33, 44])
    params = LogitsParams(input_details=True, token_logprobs=True, token_ranks=True, top_n_tokens=2)
    details = input_details(params, logits, ids)
    assert [d.token_id for d in details] == ids.tolist()
    assert math.isnan(details[0].logprob) and details[0].rank == 0 and list(details[0].top_ids) == []
    logprobs = torch.log_softmax(logits, -1)
    for i in range(1, 4):
        row = logits[i - 1]
        assert details[i].logprob == pytest.approx(logprobs[i - 1, ids[i]].item())
        assert details[i].rank == int((row > row[ids[i]]).sum()) + 1
        assert list(details[i].top_ids) == row.topk(2).indices.tolist()
    plain = input_details(LogitsParams(input_details=True), logits, ids)
    assert [(d.logprob, d.rank, list(d.top_ids)) for d in plain] == [(0.0, 0, [])] * 4
    assert len(input_details(params, logits[:1], ids[:1])) == 1
