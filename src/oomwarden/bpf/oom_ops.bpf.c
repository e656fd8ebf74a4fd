// SPDX-License-Identifier: GPL-2.0-only
/*
 * oomwarden: a BPF OOM handler (struct bpf_oom_ops, "mm: BPF OOM" v3) that
 * only carries out a decision user space made ahead of time.
 *
 * The warden ranks the victims of every domain it watches where it may
 * allocate, take locks and take its time (the policies of oomwarden.policy),
 * and keeps the head of each ranking in the hash map `ow_ranked`, keyed by
 * the domain: the kernfs id of the domain's memory cgroup (what
 * `stat -c %i` shows for its directory), 0 for the whole system. When the
 * kernel runs out of memory in a domain, handle_out_of_memory():
 *
 *   1. looks the OOMing domain up (one hash lookup): none, or a ranking older
 *      than ow_max_age_ns (a warden that stopped writing), or an OOM the
 *      ranking does not describe (cpuset or mempolicy constrained) -> 0: the
 *      kernel's own selection runs, as if no handler were loaded;
 *   2. walks the at most OW_RANKED_MAX entries in rank order, and for each
 *      re-checks that the PID still names the process that was ranked: the
 *      task found by pid is a thread-group leader with that pid, and its
 *      start time (in clock ticks, /proc/PID/stat field 22) is the ranked
 *      one; that it is still inside the OOMing memory cgroup (at most
 *      OW_MAX_DEPTH ancestors looked at); that oom_score_adj is not -1000.
 *      A PID that now names another process is skipped, never killed;
 *   3. if the kernel already chose a victim that is still on its way out
 *      (bpf_task_is_oom_victim), returns 0: the kernel's path sees that
 *      victim and waits for it instead of killing a second process;
 *   4. calls bpf_oom_kill_process() on the first entry that passes, and
 *      returns 1 if it killed (the kfunc marks the OOM as handled), else
 *      goes on with the next entry; when none is left, returns 0.
 *
 * Bounded (two constant-bounded loops), allocation-free (map lookups, an RCU
 * pid lookup and probe reads; the kill itself is the kernel's own
 * oom_kill_process()), no lock of its own. Counters in `ow_oom_stats` say
 * what each call did.
 *
 * Built against this kernel's vmlinux.h plus bpf_oom_series.h (the series'
 * declarations); it compiles here and cannot load here (no bpf_oom_ops in
 * this kernel). docs/bpf-oom.md has the design and what was and was not run.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "bpf_oom_series.h"

char LICENSE[] SEC("license") = "GPL";

/* The layout below is mirrored by oomwarden/bpf_oom.py (RANKED, VICTIM);
 * tests/test_bpf_oom.py compares both with this object's BTF. */
#define OW_RANKED_MAGIC 0x314b524fu /* "ORK1" little endian */
#define OW_RANKED_MAX 8
#define OW_MAX_DEPTH 16
#define OW_DOMAINS_MAX 256
#define OW_OOM_SCORE_ADJ_MIN (-1000)

struct ow_victim {
	__s32 pid;          /* thread-group id, initial PID namespace */
	__u32 flags;        /* none yet; 0 */
	__u64 start_ticks;  /* /proc/PID/stat field 22, when it was ranked */
};

struct ow_ranked {
	__u32 magic;        /* OW_RANKED_MAGIC */
	__u32 count;        /* entries used in victims[], at most OW_RANKED_MAX */
	__u64 generation;   /* bumped on every write by user space */
	__u64 written_ns;   /* CLOCK_BOOTTIME of the write, ns */
	struct ow_victim victims[OW_RANKED_MAX];
};

/* Replaced whole by user space (one bpf_map_update_elem per domain): a hash
 * map element is swapped in by RCU, so the handler reads either the old or
 * the new ranking, never half of each. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, OW_DOMAINS_MAX);
	__type(key, __u64);
	__type(value, struct ow_ranked);
} ow_ranked SEC(".maps");

enum ow_stat {
	OW_STAT_CALLS,      /* handler calls */
	OW_STAT_KILLED,     /* a ranked victim killed */
	OW_STAT_NO_RANKING, /* no ranking for the domain: the kernel chose */
	OW_STAT_STALE,      /* ranking too old: the kernel chose */
	OW_STAT_CONSTRAINT, /* cpuset/mempolicy OOM: the kernel chose */
	OW_STAT_IN_FLIGHT,  /* a victim already on its way out: the kernel waits */
	OW_STAT_SKIPPED,    /* entries skipped (gone, PID reused, moved, protected) */
	OW_STAT_EXHAUSTED,  /* no entry could be killed: the kernel chose */
	OW_STAT_NR,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, OW_STAT_NR);
	__type(key, __u32);
	__type(value, __u64);
} ow_oom_stats SEC(".maps");

/* Set by user space before load. USER_HZ is 100 on every architecture the
 * warden runs on; a ranking not refreshed for ow_max_age_ns is not used. */
const volatile __u64 ow_ns_per_tick = 10000000ULL;
const volatile __u64 ow_max_age_ns = 5000000000ULL;

static __always_inline void ow_count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&ow_oom_stats, &which);

	if (v)
		__sync_fetch_and_add(v, 1);
}

/* kernfs id of the memory cgroup the OOM is in; 0 for a system-wide OOM. */
static __always_inline __u64 ow_oom_domain(struct oom_control *oc)
{
	struct mem_cgroup *memcg = BPF_CORE_READ(oc, memcg);

	if (!memcg)
		return 0;
	return BPF_CORE_READ(memcg, css.cgroup, kn, id);
}

/* Whether the task's memory cgroup is `domain` or below it (0: the system). */
static __always_inline bool ow_in_domain(struct task_struct *task, __u64 domain)
{
	struct cgroup_subsys_state *css;
	int mem_id, i;

	if (!domain)
		return true;
	mem_id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	if (mem_id < 0 || mem_id >= 16)
		return false;
	css = BPF_CORE_READ(task, cgroups, subsys[mem_id]);
	for (i = 0; i < OW_MAX_DEPTH && css; i++) {
		if (BPF_CORE_READ(css, cgroup, kn, id) == domain)
			return true;
		css = BPF_CORE_READ(css, parent);
	}
	return false;
}

/* Whether `task` is still the process that was ranked as `v`. */
static __always_inline bool ow_same_process(struct task_struct *task,
					    const struct ow_victim *v, __u64 domain)
{
	__u64 start;

	if (BPF_CORE_READ(task, tgid) != v->pid)
		return false; /* the PID names a thread of another process now */
	start = BPF_CORE_READ(task, start_boottime);
	if (start / ow_ns_per_tick != v->start_ticks)
		return false; /* the PID was handed to another process */
	if (BPF_CORE_READ(task, signal, oom_score_adj) == OW_OOM_SCORE_ADJ_MIN)
		return false; /* made unkillable since it was ranked */
	return ow_in_domain(task, domain);
}

SEC("struct_ops.s/handle_out_of_memory")
int BPF_PROG(ow_handle_oom, struct oom_control *oc, struct bpf_struct_ops_link *st_link)
{
	struct ow_ranked *ranked;
	struct task_struct *task;
	__u64 domain;
	int constraint, i, rc;
	bool in_flight;

	ow_count(OW_STAT_CALLS);
	constraint = BPF_CORE_READ(oc, constraint);
	if (constraint != bpf_core_enum_value(enum oom_constraint, CONSTRAINT_NONE) &&
	    constraint != bpf_core_enum_value(enum oom_constraint, CONSTRAINT_MEMCG)) {
		ow_count(OW_STAT_CONSTRAINT);
		return 0;
	}
	domain = ow_oom_domain(oc);
	ranked = bpf_map_lookup_elem(&ow_ranked, &domain);
	if (!ranked || ranked->magic != OW_RANKED_MAGIC) {
		ow_count(OW_STAT_NO_RANKING);
		return 0;
	}
	if (bpf_ktime_get_boot_ns() - ranked->written_ns > ow_max_age_ns) {
		ow_count(OW_STAT_STALE);
		return 0;
	}
	for (i = 0; i < OW_RANKED_MAX; i++) {
		const struct ow_victim *v = &ranked->victims[i];

		if (i >= ranked->count)
			break;
		if (v->pid <= 0)
			continue;
		task = bpf_task_from_pid(v->pid);
		if (!task) {
			ow_count(OW_STAT_SKIPPED); /* exited since it was ranked */
			continue;
		}
		if (!ow_same_process(task, v, domain)) {
			bpf_task_release(task);
			ow_count(OW_STAT_SKIPPED);
			continue;
		}
		in_flight = bpf_ksym_exists(bpf_task_is_oom_victim) &&
			    bpf_task_is_oom_victim(task);
		if (in_flight) {
			bpf_task_release(task);
			ow_count(OW_STAT_IN_FLIGHT);
			return 0;
		}
		rc = bpf_oom_kill_process(oc, task, "oomwarden: ranked victim");
		bpf_task_release(task);
		if (rc == 0) {
			ow_count(OW_STAT_KILLED);
			return 1;
		}
		ow_count(OW_STAT_SKIPPED); /* the kernel refused it (-EPERM, ...) */
	}
	ow_count(OW_STAT_EXHAUSTED);
	return 0;
}

SEC(".struct_ops.link")
struct bpf_oom_ops___ow oomwarden_oom_ops = {
	.handle_out_of_memory = (void *)ow_handle_oom,
	.name = "oomwarden",
};
