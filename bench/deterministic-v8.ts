/**
 * Node flags that make V8 deterministic enough for callgrind to count the same instructions
 * run after run: no background compiler or GC threads, no timing-dependent decisions, fixed
 * hash and random seeds (without the seeds and `--single-threaded`, counts scatter ±5 %).
 */
export const DETERMINISTIC_V8 = ['--single-threaded', '--predictable', '--hash-seed=1', '--random-seed=1'];
