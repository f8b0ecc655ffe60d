"""DAPO's dynamic sampling (GRPOConfig.dynamic_sampling, max_num_gen_batches): a group whose G completions all
got the same reward has zero advantages and gives no gradient, so it leaves the step, and more prompts are rolled
out until the step holds its full number of groups (per_device_train_batch_size x gradient_accumulation_steps x
processes) or max_num_gen_batches batches were drawn; then the step trains on what it has.

    rollouts, metrics = fill_step(dist, cfg, rollouts, more, roll)

A batch drawn (verl's "gen batch") is one step's prompts (the same number, sharded over the ranks as a step's
are), the next ones of the epoch's order; `more()` draws this rank's share (None once the epoch has no more),
`roll(micro)` rolls it out as the step's own prompts are (grpo/step.py's step_rollouts: generation batches of
GRPOConfig.generation_batch_size prompts, one engine call each). Every decision is taken on counts summed over
the ranks, so all ranks draw as many batches and agree on the step's groups before the policy pass. Where the
kept groups outnumber the step's, the first ones in data order are trained (batch drawn, then rank, then
position: the order one process would see), so N ranks keep the groups one process keeps. Metrics:
num_gen_batches (batches drawn, the step's own included), prompts_consumed and groups_dropped (rolled out but not
trained on: zero variance, or beyond the step's number), summed over ranks. The trainer advances the data
position by every batch drawn, so a resumed run draws what the straight one did.
"""
from __future__ import annotations

from omni_fast import distributed
from omni_fast.grpo.rollout import Rollout, select_groups


def varied_groups(ro: Rollout, group_size: int) -> list[int]:
    """The prompts of `ro` whose G total rewards are not all equal (the groups with a gradient)."""
    rewards = ro.total_rewards.view(-1, group_size)                                    # (B, G)
    return (rewards.amax(1) > rewards.amin(1)).nonzero().flatten().tolist()


def fill_step(dist, cfg, rollouts: list[Rollout], more, roll) -> tuple[list[Rollout], dict]:
    """The step's rollouts with only varied groups, at most its full number of them, drawing more generation
    batches as said above; and the sampling metrics."""
    g, target = cfg.num_generations, cfg.prompts_per_step * dist.world_size
    kept: list[Rollout] = []
    have = drawn = prompts = 0
    batch = rollouts
    while True:
        drawn += 1
        varied = [varied_groups(ro, g) for ro in batch]
        # per rank, in rank order: (varied groups, prompts) of this batch
        counts = distributed.all_gather_objects(dist, (sum(len(v) for v in varied), sum(len(ro) for ro in batch)))
        quota = max(0, min(counts[dist.rank][0], target - have - sum(c for c, _ in counts[:dist.rank])))
        for ro, groups in zip(batch, varied):
            take = groups[:quota]
            quota -= len(take)
            if take:
                kept.append(select_groups(ro, take, g))
        prompts += sum(n for _, n in counts)
        have = min(target, have + sum(c for c, _ in counts))
        if have >= target or drawn >= cfg.max_num_gen_batches:
            break
        micro = more()
        if micro is None:
            break
        batch = roll(micro)
    return kept, {"num_gen_batches": drawn, "prompts_consumed": prompts, "groups_dropped": prompts - have,
                  "groups": have}
