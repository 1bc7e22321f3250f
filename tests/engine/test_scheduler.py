"""The scheduler alone, without llama.cpp: slot choice, the prefix cache tiers, budgets, forks, cancellation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ember
from ember.engine.scheduler import EXACT_CHUNK, ITL_BURST_STEPS, Scheduler, StepPlan, common_prefix
from ember.engine.sequence import CacheSource, DoneReason, Phase, Sequence, SequenceRequest
from ember.engine.step_costs import ITL_FACTOR, StepCosts
from ember.options import sampling_options

SAMPLING = sampling_options({"temperature": 0})
TEMPLATE = [1, 7, 7, 7, 2]  # what every chat starts with: BOS, "<|im_start|>system\n" ...


def sequence(prompt: list[int], max_new: int = 4) -> Sequence:
    return Sequence(SequenceRequest(list(prompt), SAMPLING, max_new))


def conversation(seed: int, length: int) -> list[int]:
    """A chat prompt: the shared template start, then tokens of its own."""
    return TEMPLATE + [1000 + seed * 10_000 + i for i in range(length - len(TEMPLATE))]


def step(scheduler: Scheduler, token: int = 5) -> StepPlan:
    """One step as the engine makes it: every sampled row gets `token`; a sequence ends at its max_new."""
    plan = scheduler.schedule()
    sampled, finished = {}, {}
    for rows in plan.rows:
        if not rows.sample:
            continue
        family = [rows.sequence]
        if rows.sequence.phase is Phase.PREFILL:
            family += [fork for fork in rows.sequence.forks if fork.phase is Phase.FORKED]
        for member in family:
            sampled[member] = token
            if len(member.output_tokens) + 1 >= member.request.max_new_tokens:
                finished[member] = DoneReason.LENGTH
    for entry in plan.saves:  # the executor reports each saved entry's size: 10 bytes per token here
        scheduler.host.saved(entry.entry, 10 * entry.cells)
    scheduler.update(plan, sampled, finished)
    return plan


def run(scheduler: Scheduler, *sequences: Sequence) -> list[StepPlan]:
    for item in sequences:
        scheduler.add(item)
    plans = []
    while not all(item.done for item in sequences):
        plans.append(step(scheduler))
        assert len(plans) < 10_000
    return plans


def make(slots: int = 2, *, host: int = 0, capacity: int = 512, num_ctx: int = 4096, **kwargs: object) -> Scheduler:
    return Scheduler(slots=slots, batch_capacity=capacity, num_ctx=num_ctx, host_budget=host, **kwargs)


def setup_of(plan: StepPlan, item: Sequence):
    return next(setup for setup in plan.setups if setup.sequence is item)


def test_common_prefix_matches_a_plain_loop() -> None:
    @given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
    def check(first: list[int], second: list[int]) -> None:
        expected = 0
        while expected < min(len(first), len(second)) and first[expected] == second[expected]:
            expected += 1
        assert common_prefix(first, second) == expected

    check()


def test_a_chat_sharing_only_the_template_takes_an_empty_slot_not_another_chats_cache() -> None:
    scheduler = make(slots=2)
    first = sequence(conversation(1, 500))
    run(scheduler, first)
    cached = list(scheduler.slots[first_slot(scheduler)].tokens)
    assert len(cached) == 500 + 3  # the prompt and the generated tokens decoded after it

    newcomer = sequence(conversation(2, 300))
    plan = step_until_started(scheduler, newcomer)
    setup = setup_of(plan, newcomer)
    assert scheduler.slots[setup.slot].tokens == newcomer.prompt_tokens[: setup.keep]
    assert setup.keep == 0 and setup.copy_from is None  # 5 template tokens are not worth a stream copy
    assert [slot.tokens for slot in scheduler.slots if slot.owner is None] == [cached]


def first_slot(scheduler: Scheduler) -> int:
    return next(slot.index for slot in scheduler.slots if slot.tokens)


def step_until_started(scheduler: Scheduler, item: Sequence) -> StepPlan:
    scheduler.add(item)
    plan = step(scheduler)
    assert item in plan.started
    return plan


def test_the_next_turn_of_a_chat_reuses_its_own_slot() -> None:
    scheduler = make(slots=4)
    chat = conversation(1, 200)
    first = sequence(chat)
    run(scheduler, first)
    next_turn = sequence([*first.kv_tokens(), 9, 9, 9])
    plan = step_until_started(scheduler, next_turn)
    setup = setup_of(plan, next_turn)
    assert (setup.keep, setup.copy_from, setup.restore) == (len(first.kv_tokens()), None, None)
    assert next_turn.cache_source is CacheSource.SLOT and next_turn.cached_tokens == setup.keep
    assert next_turn.prompt_eval_count == 3


def test_a_shared_system_prompt_is_copied_from_a_running_slot() -> None:
    scheduler = make(slots=3)
    system = conversation(1, 300)
    running = sequence([*system, 50, 51], max_new=100)
    scheduler.add(running)
    step(scheduler)
    step(scheduler)  # decoding now
    other_user = sequence([*system, 60, 61, 62])
    plan = step_until_started(scheduler, other_user)
    setup = setup_of(plan, other_user)
    assert setup.copy_from == running.slot and setup.slot != running.slot
    assert setup.keep == 300
    assert other_user.cache_source is CacheSource.COPY
    # The copy source is left alone in this step; the newcomer prefills only its own 3 tokens.
    rows = next(rows for rows in plan.rows if rows.sequence is other_user)
    assert (rows.start, rows.tokens) == (300, [60, 61, 62])


def test_more_chats_than_slots_come_back_from_host_ram() -> None:
    scheduler = make(slots=2, host=1 << 20)
    chats = [sequence(conversation(seed, 100)) for seed in range(4)]
    for chat in chats:
        run(scheduler, chat)
    # Chats 0 and 1 lost their slots to 2 and 3 and were saved to host RAM before.
    assert len(scheduler.host.entries) == 2
    returning = sequence([*chats[0].kv_tokens(), 9, 9])
    plan = step_until_started(scheduler, returning)
    setup = setup_of(plan, returning)
    assert setup.restore is not None and setup.keep == len(chats[0].kv_tokens())
    assert returning.cache_source is CacheSource.HOST and returning.prompt_eval_count == 2
    # The slot it took held chat 2 or 3, which went to host RAM first; the restored entry left it.
    assert [save.slot for save in plan.saves] == [setup.slot]
    assert setup.restore not in scheduler.host.entries
    assert len(scheduler.host.entries) == 2


def test_without_host_ram_the_least_recently_used_slot_is_reused() -> None:
    scheduler = make(slots=2)
    chats = [sequence(conversation(seed, 100)) for seed in range(2)]
    for chat in chats:
        run(scheduler, chat)
    oldest = next(slot.index for slot in scheduler.slots if slot.tokens == chats[0].kv_tokens())
    plan = step_until_started(scheduler, sequence(conversation(3, 100)))
    assert plan.setups[0].slot == oldest
    assert not plan.saves


def test_the_host_tier_evicts_the_least_recently_used_entries_to_fit_its_budget() -> None:
    scheduler = make(slots=1, host=2500)  # 10 bytes a token: room for two 100-token chats, not three
    chats = [sequence(conversation(seed, 100)) for seed in range(4)]
    for chat in chats:
        run(scheduler, chat)
    assert scheduler.host.used <= 2500
    remaining = {tuple(entry.tokens) for entry in scheduler.host.entries.values()}
    assert remaining == {tuple(chats[1].kv_tokens()), tuple(chats[2].kv_tokens())}
    step(scheduler)  # the evicted entries go to the executor to be freed
    assert not scheduler.host.take_drops()


def test_prefill_next_to_decoding_streams_is_bounded_to_keep_their_step_time() -> None:
    costs = StepCosts()
    costs.observe_step(decode_rows=2, prefill_tokens=0, seconds=0.010)
    costs.observe_step(decode_rows=0, prefill_tokens=500, seconds=0.5)  # 1 ms a token
    assert costs.prefill_budget(2) == int((ITL_FACTOR - 1) * 0.010 / 0.001)
    scheduler = make(slots=3, costs=costs)
    streams = [sequence([1, 2, 3], max_new=50), sequence([4, 5, 6], max_new=50)]
    for stream in streams:
        scheduler.add(stream)
    step(scheduler)
    long_prompt = sequence(list(range(100, 1100)))
    scheduler.add(long_prompt)
    burst = step(scheduler)  # after steps that prefilled nothing beside them, a burst of ITL_BURST_STEPS budgets
    assert burst.decode_rows == 2 and burst.prefill_tokens == ITL_BURST_STEPS * 10
    steady = [step(scheduler) for _ in range(3)]
    assert [plan.prefill_tokens for plan in steady] == [10, 10, 10]  # then the steady budget
    for stream in streams:
        scheduler.cancel(stream)
    assert step(scheduler).prefill_tokens == 512  # nothing decoding: whole batches
    alone = make(slots=1, costs=costs)
    alone.add(sequence(list(range(100, 1100))))
    assert alone.schedule().prefill_tokens == 512  # nothing decoding: whole batches


def test_an_interactive_prompt_takes_the_prefill_budget_before_batch_lines() -> None:
    costs = StepCosts()
    costs.observe_step(decode_rows=1, prefill_tokens=0, seconds=0.010)
    costs.observe_step(decode_rows=0, prefill_tokens=500, seconds=0.5)  # 10 prompt tokens a step beside a stream
    scheduler = make(slots=4, costs=costs)
    stream = sequence([1, 2, 3], max_new=100)
    scheduler.add(stream)
    step(scheduler)
    batch_lines = [Sequence(SequenceRequest(list(range(200, 300)), SAMPLING, 4, priority=2)) for _ in range(2)]
    for line in batch_lines:
        scheduler.add(line)
    step(scheduler)  # the batch lines were admitted first and are prefilling
    interactive = sequence(list(range(500, 512)))  # normal priority, 12 tokens
    scheduler.add(interactive)
    plan = step(scheduler)
    chunks = {rows.sequence: len(rows.tokens) for rows in plan.rows if rows.sequence.phase is not Phase.DECODE}
    assert chunks == {interactive: 10}  # the step's whole prefill budget, though the batch lines came first
    assert all(line.n_past < 100 for line in batch_lines)


def test_a_short_prompt_beside_streams_gets_a_step_of_its_own() -> None:
    costs = StepCosts()
    costs.observe_step(decode_rows=2, prefill_tokens=0, seconds=0.010)
    costs.observe_step(decode_rows=0, prefill_tokens=500, seconds=0.5)
    scheduler = make(slots=6, costs=costs)
    streams = [sequence([1, 2, 3], max_new=50), sequence([4, 5, 6], max_new=50)]
    for stream in streams:
        scheduler.add(stream)
    step(scheduler)
    short = sequence(list(range(100, 108)))
    scheduler.add(short)
    plan = step(scheduler)
    assert [rows.sequence for rows in plan.rows] == [short] and plan.rows[0].sample  # its whole prompt, alone
    plan = step(scheduler)
    assert {rows.sequence for rows in plan.rows} == {*streams, short} and plan.prefill_tokens == 0
    # Short requests arriving every step: every other step, the streams' rows go in with them.
    arrivals = [sequence(list(range(400 + 10 * i, 405 + 10 * i)), max_new=50) for i in range(2)]
    scheduler.add(arrivals[0])
    assert step(scheduler).decode_rows == 0
    scheduler.add(arrivals[1])
    plan = step(scheduler)
    assert set(streams) <= {rows.sequence for rows in plan.rows} and plan.prefill_tokens == 5
    for arrival in arrivals:
        scheduler.cancel(arrival)
    # A prompt that needs several steps goes beside the streams; so does a batch line's.
    for waiting in (sequence(list(range(200, 300))), Sequence(SequenceRequest([7, 8, 9], SAMPLING, 4, priority=2))):
        scheduler.add(waiting)
        plan = step(scheduler)
        assert set(streams) <= {rows.sequence for rows in plan.rows} and plan.prefill_tokens > 0
        scheduler.cancel(waiting)


def test_beside_batch_lines_alone_prompts_go_in_whole_batches() -> None:
    costs = StepCosts()
    costs.observe_step(decode_rows=1, prefill_tokens=0, seconds=0.010)
    costs.observe_step(decode_rows=0, prefill_tokens=500, seconds=0.5)
    scheduler = make(slots=3, costs=costs)
    scheduler.add(Sequence(SequenceRequest([1, 2, 3], SAMPLING, 100, priority=2)))
    step(scheduler)
    scheduler.add(Sequence(SequenceRequest(list(range(100, 400)), SAMPLING, 4, priority=2)))
    assert step(scheduler).prefill_tokens == 300  # no stream anyone watches: no latency bound, the whole prompt


def test_one_cold_step_does_not_steer_the_budgets() -> None:
    costs = StepCosts()
    costs.observe_step(decode_rows=0, prefill_tokens=100, seconds=5.0)  # the first step after a load: cold
    costs.observe_step(decode_rows=0, prefill_tokens=100, seconds=0.1)  # then 1 ms a token
    assert costs.prefill_token == 0.001  # not a blend with the cold step
    costs.observe_step(decode_rows=0, prefill_tokens=100, seconds=0.3)  # a step the machine slowed
    assert costs.prefill_token == 0.001


def test_noise_in_one_token_chunks_does_not_shrink_the_budget() -> None:
    # A budget of a token a step: each step's time over a decode-only step is mostly noise, here from 4 ms under to
    # 14 ms over a true 1 ms. Dropping the steps that came out faster than decode-only ones would make a token cost
    # several ms, the budget smaller, and the next chunks as noisy: it would never recover.
    costs = StepCosts()
    costs.observe_step(decode_rows=2, prefill_tokens=0, seconds=0.010)
    for noise in [0.014, -0.004, 0.006, -0.003, 0.002, -0.001, 0.001, 0.0, -0.002]:
        costs.observe_step(decode_rows=2, prefill_tokens=1, seconds=0.010 + 0.001 + noise)
    assert costs.prefill_token == pytest.approx(0.001)
    # Beside streams a token can cost more than in a whole-batch prefill; the steps beside streams say so.
    costs.observe_step(decode_rows=0, prefill_tokens=500, seconds=0.25)  # 0.5 ms a token in a whole batch
    for _ in range(StepCosts.WINDOW):
        costs.observe_step(decode_rows=2, prefill_tokens=5, seconds=0.015)
    assert costs.prefill_token == pytest.approx(0.001)
    assert costs.prefill_budget(2) in (9, 10)  # 10 ms / 1 ms, give or take a float's rounding
    # Steps timed faster than decode-only ones do not make the budget unbounded.
    for _ in range(StepCosts.WINDOW):
        costs.observe_step(decode_rows=2, prefill_tokens=20, seconds=0.009)
    assert costs.prefill_token == pytest.approx(0.00005)


def test_a_row_count_never_run_alone_gets_a_decode_time_from_its_neighbours() -> None:
    costs = StepCosts()
    costs.observe_step(decode_rows=1, prefill_tokens=0, seconds=0.010)
    costs.observe_step(decode_rows=0, prefill_tokens=100, seconds=0.2)  # 2 ms a prompt token
    # Streams joining one by one: 3 rows have only ever run beside a prefill. Each row more costs about a token.
    assert costs.decode_step(3) == pytest.approx(0.014)
    assert costs.prefill_budget(3) == 7  # not the 5 that 1 row's time would give
    costs.observe_step(decode_rows=8, prefill_tokens=0, seconds=0.024)
    assert costs.decode_step(4) == pytest.approx(0.016)  # between the counts measured
    assert costs.decode_step(8) == pytest.approx(0.024)
    assert costs.decode_step(12) == pytest.approx(0.032)


def test_deterministic_mode_prefills_exact_chunks() -> None:
    scheduler = make(slots=2, deterministic=True)
    first, second = sequence(list(range(10, 210))), sequence(list(range(300, 330)))
    scheduler.add(first)
    scheduler.add(second)
    plan = scheduler.schedule()
    assert [(rows.sequence, len(rows.tokens)) for rows in plan.rows] == [(first, EXACT_CHUNK), (second, 30)]


def test_rows_go_in_slot_order_and_decoding_rows_come_first_in_the_budget() -> None:
    scheduler = make(slots=4, capacity=8)
    streams = [sequence([i, i + 1], max_new=50) for i in range(0, 6, 2)]
    for stream in streams:
        scheduler.add(stream)
    step(scheduler)
    waiting = sequence(list(range(100, 120)))
    scheduler.add(waiting)
    plan = scheduler.schedule()
    assert [rows.sequence.slot for rows in plan.rows] == sorted(rows.sequence.slot for rows in plan.rows)
    assert plan.decode_rows == 3 and plan.prefill_tokens == 5  # 8 rows in all


def test_forks_share_their_parents_prompt() -> None:
    scheduler = make(slots=4)
    parent = sequence(list(range(10, 60)), max_new=3)
    parent.forks = [Sequence(parent.request, parent=parent) for _ in range(2)]
    scheduler.add(parent)
    first = step(scheduler)
    assert {setup.sequence for setup in first.setups} == {parent, *parent.forks}
    assert [rows.sequence for rows in first.rows] == [parent]  # the prompt is decoded once
    assert all(fork.phase is Phase.DECODE and fork.cached_tokens == 50 for fork in parent.forks)
    second = step(scheduler)
    copies = [(setup.sequence, setup.copy_from) for setup in second.setups]
    assert copies == [(fork, parent.slot) for fork in parent.forks]
    assert {rows.sequence for rows in second.rows} == {parent, *parent.forks}


def test_a_fork_that_ends_on_its_parents_logits_leaves_no_cache_claim() -> None:
    scheduler = make(slots=2)
    parent = sequence(list(range(10, 60)), max_new=1)
    fork = Sequence(parent.request, parent=parent)
    parent.forks = [fork]
    run(scheduler, parent)
    assert fork.done and fork.output_tokens == [5]
    assert sorted(len(slot.tokens) for slot in scheduler.slots) == [0, 50]


def test_cancelling_a_waiting_parent_lets_its_forks_run_alone() -> None:
    scheduler = make(slots=1)
    blocker = sequence([1, 2, 3], max_new=100)
    scheduler.add(blocker)
    step(scheduler)
    parent = sequence([4, 5, 6])
    fork = Sequence(parent.request, parent=parent)
    parent.forks = [fork]
    scheduler.add(parent)
    assert scheduler.cancel(parent) and parent.done_reason is DoneReason.CANCELLED
    assert list(scheduler.waiting) == [fork] and fork.parent is None
    assert not scheduler.cancel(blocker)  # running: it ends at the next step
    plan = step(scheduler)
    assert plan.cancelled == [blocker] and fork in plan.started


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["submit", "fork", "cancel", "step"]), st.integers(0, 5), st.integers(1, 90)),
        max_size=60,
    ),
    st.integers(1, 4),
    st.sampled_from([0, 3000]),
)
def test_no_slot_is_ever_lost_or_shared(actions: list[tuple[str, int, int]], slots: int, host: int) -> None:
    scheduler = make(slots=slots, host=host, capacity=64, num_ctx=256)
    everything: list[Sequence] = []
    for action, seed, length in actions:
        if action == "submit":
            item = sequence(conversation(seed, length + len(TEMPLATE)), max_new=1 + seed)
            scheduler.add(item)
            everything.append(item)
        elif action == "fork" and slots >= 2:
            item = sequence(conversation(seed, length + len(TEMPLATE)), max_new=2)
            item.forks = [Sequence(item.request, parent=item)]
            scheduler.add(item)
            everything += [item, *item.forks]
        elif action == "cancel" and everything:
            scheduler.cancel(everything[seed % len(everything)])
        else:
            step(scheduler)
        check_invariants(scheduler)
    for _ in range(2000):
        if not scheduler.has_work():
            break
        step(scheduler)
        check_invariants(scheduler)
    assert all(item.done for item in everything)
    assert not scheduler.running and len(scheduler.free_slots()) == slots


def check_invariants(scheduler: Scheduler) -> None:
    owners = [slot.owner for slot in scheduler.slots if slot.owner is not None]
    assert len(owners) == len({id(owner) for owner in owners}) == len(scheduler.running)
    for item in scheduler.running:
        assert scheduler.slots[item.slot].owner is item
        assert item.n_past <= len(item.prompt_tokens) + len(item.output_tokens)
    for slot in scheduler.slots:
        if slot.owner is None:
            assert len(slot.tokens) <= scheduler.num_ctx
    assert scheduler.host.used <= scheduler.host.budget or not scheduler.host.entries


def test_the_scheduler_and_what_it_imports_never_import_llama_cpp() -> None:
    """Its modules' own imports, followed through ember's modules (the package's __init__ loads the model API)."""
    source_root = Path(ember.__file__).parent.parent
    seen, pending = set(), ["ember.engine.scheduler"]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((source_root / (name.replace(".", "/") + ".py")).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            assert not any(imported.split(".")[0] == "llama_cpp" for imported in names), name
            pending += [imported for imported in names if imported.startswith("ember.") and imported not in seen]
    assert {"ember.engine.sequence", "ember.engine.text", "ember.options"} <= seen
