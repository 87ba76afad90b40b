use std::collections::HashMap;

use super::*;

fn scheduler(blocks: usize, block_size: usize, seqs: usize, batch: usize) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_seqs: seqs,
            max_batch_tokens: batch,
        },
        BlockManager::new(blocks, block_size),
    )
}

/// Checks the plan's invariants against the scheduler's state.
fn check_plan(s: &Scheduler, plan: &StepPlan) {
    assert!(plan.tokens() <= s.config().max_batch_tokens, "{plan:?}");
    assert!(s.running() <= s.config().max_num_seqs);
    for span in &plan.spans {
        assert!(span.len > 0);
        let table = s.block_table(span.seq);
        assert!(
            table.len() * s.blocks().block_size() >= span.start + span.len,
            "blocks for every position of {span:?}"
        );
        assert!(!plan.preempted.contains(&span.seq));
    }
    let mut seen: Vec<_> = plan.spans.iter().map(|s| s.seq).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), plan.spans.len(), "one span per sequence");
}

/// Runs every sequence to `new_tokens` generated tokens, "sampling" a token that
/// depends only on the sequence's own tokens (as greedy decoding does).
/// Returns each sequence's tokens and the number of steps.
fn run_to_end(s: &mut Scheduler, new_tokens: usize) -> (HashMap<SeqId, Vec<u32>>, usize) {
    let mut prompt_len: HashMap<SeqId, usize> = HashMap::new();
    let mut done = HashMap::new();
    let mut steps = 0;
    while s.has_work() {
        let plan = s.schedule();
        check_plan(s, &plan);
        assert!(!plan.spans.is_empty(), "work left but nothing scheduled");
        s.complete(&plan);
        steps += 1;
        for span in plan.spans.iter().filter(|sp| sp.completes) {
            let tokens = s.tokens(span.seq).to_vec();
            let plen = *prompt_len.entry(span.seq).or_insert(tokens.len());
            if tokens.len() - plen == new_tokens {
                done.insert(span.seq, tokens);
                s.remove(span.seq);
            } else {
                let next = tokens.iter().fold(7u32, |h, t| h.wrapping_mul(31) ^ t) % 1000;
                s.append(span.seq, next);
            }
        }
        assert!(steps < 100_000, "no progress");
    }
    (done, steps)
}

fn prompt(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i * 13 + seed).collect()
}

#[test]
fn sequences_join_and_leave_and_every_block_comes_back() {
    let mut s = scheduler(64, 4, 4, 32);
    for i in 0..10 {
        s.add(i, prompt(5 + i as usize * 3, i as u32), 0, true);
    }
    let (done, _) = run_to_end(&mut s, 6);
    assert_eq!(done.len(), 10);
    assert_eq!(s.blocks().used(), 0);
    assert_eq!(s.running() + s.waiting(), 0);
}

#[test]
fn long_prompts_are_chunked_and_decoders_keep_going() {
    let mut s = scheduler(256, 4, 4, 16);
    s.add(1, prompt(3, 1), 0, true);
    // Step 1: the short prompt.
    let plan = s.schedule();
    assert_eq!(plan.spans.len(), 1);
    s.complete(&plan);
    s.append(1, 5);
    s.add(2, prompt(100, 2), 0, true);
    // From now on, every step decodes sequence 1 and feeds sequence 2 a chunk.
    for _ in 0..5 {
        let plan = s.schedule();
        check_plan(&s, &plan);
        assert_eq!(plan.spans[0].seq, 1, "decoders first");
        assert_eq!(plan.spans[0].len, 1);
        assert_eq!(plan.spans[1].seq, 2);
        assert_eq!(plan.spans[1].len, 15, "the rest of the budget");
        assert!(!plan.spans[1].completes);
        s.complete(&plan);
        s.append(1, 9);
    }
}

#[test]
fn a_tiny_cache_preempts_and_still_finishes_everything_the_same() {
    let prompts: Vec<_> = (0..6).map(|i| prompt(10 + i * 5, i as u32)).collect();
    let run = |blocks| {
        let mut s = scheduler(blocks, 4, 6, 64);
        for (i, p) in prompts.iter().enumerate() {
            s.add(i as u64, p.clone(), 0, true);
        }
        let (done, _) = run_to_end(&mut s, 12);
        assert_eq!(s.blocks().used(), 0);
        (done, s.stats().preemptions)
    };
    let (roomy, none) = run(512);
    assert_eq!(none, 0);
    // The longest sequence needs 10 blocks; 12 hold barely one at a time.
    let (tight, preemptions) = run(12);
    assert!(preemptions > 0, "the tiny cache forced preemptions");
    assert_eq!(tight, roomy, "same tokens with and without pressure");
}

#[test]
fn a_new_request_starts_while_a_long_prompt_is_read() {
    let mut s = scheduler(256, 4, 4, 16);
    s.add(1, prompt(200, 1), 0, true);
    let plan = s.schedule();
    assert_eq!(
        plan.spans[0].len, 16,
        "the long prompt takes the whole budget alone"
    );
    s.complete(&plan);
    s.add(2, prompt(5, 2), 0, true);
    let plan = s.schedule();
    check_plan(&s, &plan);
    let short = plan
        .spans
        .iter()
        .find(|sp| sp.seq == 2)
        .expect("admitted at once");
    assert_eq!(short.len, 5);
    assert!(short.completes, "its first token comes out of this step");
    let long = plan
        .spans
        .iter()
        .find(|sp| sp.seq == 1)
        .expect("the long prompt goes on");
    assert_eq!(long.len, 11, "with the rest of the budget");
    // With half the budget reserved, a stream of new long prompts cannot stall it.
    s.complete(&plan);
    s.append(2, 7);
    s.add(3, prompt(100, 3), 0, true);
    let plan = s.schedule();
    let len = |id| {
        plan.spans
            .iter()
            .find(|sp| sp.seq == id)
            .map_or(0, |sp| sp.len)
    };
    assert_eq!((len(2), len(3), len(1)), (1, 8, 7));
}

#[test]
fn a_repeated_prefix_is_served_from_the_cache() {
    let mut s = scheduler(64, 4, 4, 64);
    let system = prompt(40, 3);
    s.add(1, system.clone(), 0, true);
    run_to_end(&mut s, 2);
    let before = s.stats();
    let mut second = system.clone();
    second.extend([1, 2, 3]);
    s.add(2, second, 0, true);
    let plan = s.schedule();
    assert_eq!(plan.spans[0].start, 40, "starts after the cached blocks");
    assert_eq!(plan.spans[0].len, 3, "only the new tokens are computed");
    s.complete(&plan);
    let after = s.stats();
    assert_eq!(after.prefix_hit_tokens - before.prefix_hit_tokens, 40);
    assert_eq!(after.computed_tokens - before.computed_tokens, 3);
    s.remove(2);
    assert_eq!(s.blocks().used(), 0);
}

#[test]
fn cached_blocks_serve_only_sequences_of_the_same_root() {
    let (a, b) = (Some(BlockHash::root(1)), Some(BlockHash::root(2)));
    let mut s = scheduler(64, 4, 4, 64);
    s.add_under(1, prompt(20, 5), 0, true, a);
    run_to_end(&mut s, 1);
    // The base and another adapter compute everything; the same adapter reuses.
    for (id, root, start) in [(2, None, 0), (3, b, 0), (4, a, 16)] {
        s.add_under(id, prompt(20, 5), 0, true, root);
        let plan = s.schedule();
        assert_eq!(plan.spans[0].start, start, "sequence {id}");
        s.complete(&plan);
        s.remove(id);
    }
}

#[test]
fn an_identical_prompt_recomputes_its_last_token() {
    let mut s = scheduler(64, 4, 4, 64);
    s.add(1, prompt(16, 0), 0, true);
    run_to_end(&mut s, 1);
    s.add(2, prompt(16, 0), 0, true);
    let plan = s.schedule();
    // 16 tokens = 4 full blocks; the last block is recomputed for its logits.
    assert_eq!((plan.spans[0].start, plan.spans[0].len), (12, 4));
    assert!(plan.spans[0].completes);
}

#[test]
fn sequences_without_prefix_caching_compute_everything() {
    let mut s = scheduler(64, 4, 4, 64);
    s.add(1, prompt(16, 0), 0, true);
    run_to_end(&mut s, 1);
    s.add(2, prompt(16, 0), 0, false);
    let plan = s.schedule();
    assert_eq!((plan.spans[0].start, plan.spans[0].len), (0, 16));
}

#[test]
fn priority_then_arrival_decides_admission() {
    let mut s = scheduler(64, 4, 1, 64);
    s.add(1, prompt(4, 1), 0, true);
    s.add(2, prompt(4, 2), 0, true);
    s.add(3, prompt(4, 3), 5, true);
    let first = s.schedule();
    assert_eq!(first.spans[0].seq, 3, "higher priority first");
    s.remove(3);
    let next = s.schedule();
    assert_eq!(next.spans[0].seq, 1, "then first come, first served");
}

#[test]
fn running_set_and_token_budget_are_bounded() {
    let mut s = scheduler(1024, 4, 3, 10);
    for i in 0..8 {
        s.add(i, prompt(20, i as u32), 0, true);
    }
    let plan = s.schedule();
    check_plan(&s, &plan);
    assert_eq!(plan.tokens(), 10);
    assert!(s.running() <= 3);
}

#[test]
fn cancelling_mid_prefill_returns_the_blocks() {
    let mut s = scheduler(64, 4, 4, 8);
    s.add(1, prompt(40, 1), 0, true);
    let plan = s.schedule();
    s.complete(&plan);
    assert!(s.blocks().used() > 0);
    s.remove(1);
    assert_eq!(s.blocks().used(), 0);
    assert!(!s.has_work());
}
