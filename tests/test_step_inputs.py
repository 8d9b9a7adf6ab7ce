"""A step's layout (StepInputs.build) and its trip to the tensor-parallel workers.

Checked by hand on a step that mixes a prompt chunk, a decode row whose token is
still on the device, a sequence computing and sampling several positions (the
shape of a speculative verify step) and prompt-logprob rows.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from orbitllm import SamplingParams
from orbitllm.engine.step_data import ScheduledRequest, SchedulerOutput
from orbitllm.executor.step_inputs import StepInputs
from orbitllm.executor.tensor_parallel import StepChannel

BLOCK = 4
GREEDY = SamplingParams(temperature=0)


def _mixed_step() -> SchedulerOutput:
    return SchedulerOutput([
        # a: the first chunk of a 9-token prompt with prompt logprobs; samples nothing
        ScheduledRequest("a", 0, 5, [10, 11, 12, 13, 14], [7, 8, 9], SamplingParams(prompt_logprobs=2),
                         prompt_logprob_targets=[11, 12, 13, 14, 15]),
        # b: a decode row whose input token the step in flight sampled
        ScheduledRequest("b", 6, 1, [], [3, 4], GREEDY, num_sampled=1, seed=5, num_output_tokens=2),
        # c: three positions, the last two pending, sampled at all three
        ScheduledRequest("c", 3, 3, [30], [1, 2], GREEDY, num_sampled=3, num_output_tokens=4),
    ])


def test_a_mixed_step_is_laid_out_row_by_row():
    prev_rows = {"x": range(0, 1), "b": range(1, 2), "c": range(2, 5)}
    inputs = StepInputs.build(_mixed_step(), BLOCK, prev_rows)
    assert inputs.input_ids.tolist() == [10, 11, 12, 13, 14, 0, 30, 0, 0]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 6, 3, 4, 5]
    assert inputs.query_start_loc.tolist() == [0, 5, 6, 9]
    assert inputs.seq_lens.tolist() == [5, 7, 6]
    assert inputs.block_tables.tolist() == [[7, 8, 9], [3, 4, 0], [1, 2, 0]]
    # slot = block id * 4 + offset, e.g. c's position 4 lies in its second block, 2
    assert inputs.slots.tolist() == [28, 29, 30, 31, 32, 18, 7, 8, 9]
    assert inputs.pending_rows.tolist() == [5, 7, 8]
    assert inputs.pending_src.tolist() == [1, 3, 4]    # b's one row; c's last two of three
    assert inputs.sample_rows.tolist() == [5, 6, 7, 8]
    assert inputs.prompt_groups() == [[0, 1, 2, 3, 4]]
    assert (inputs.max_query_len, inputs.max_seq_len, inputs.uniform_query_len) == (5, 7, None)
    rows = inputs.sampling.rows
    assert rows.request_ids == ["b", "c", "c", "c"]
    assert rows.output_index == [2, 4, 5, 6]
    assert rows.seeds == [5, None, None, None]
    group = inputs.sampling.prompt_logprobs[0]
    assert (group.request_id, group.num_top, group.targets) == ("a", 2, [11, 12, 13, 14, 15])


def test_equal_query_lengths_are_one_shape():
    step = SchedulerOutput([ScheduledRequest(r, 8, 2, [1, 2], [0, 1, 2], GREEDY, num_sampled=2)
                            for r in "pq"])
    inputs = StepInputs.build(step, BLOCK)
    assert inputs.uniform_query_len == 2
    assert inputs.sample_rows.tolist() == [0, 1, 2, 3]
    assert inputs.pending_rows.size == 0


def test_the_channel_carries_every_wire_field_and_keeps_sampling_home():
    sent = StepInputs.build(_mixed_step(), BLOCK, {"b": range(0, 1), "c": range(1, 4)})
    packed = StepChannel.pack(sent)
    assert packed.dtype == np.int64 and packed[1] == packed.size
    got = StepChannel.unpack(packed)
    assert got.sampling is None
    for f in dataclasses.fields(StepInputs):
        if f.name == "sampling":
            continue
        a, b = getattr(sent, f.name), getattr(got, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f.name
        else:
            assert a == b, f.name
