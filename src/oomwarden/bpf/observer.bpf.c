// SPDX-License-Identifier: GPL-2.0-only
/*
 * oomwarden: the kernel's own OOM kills, one ring-buffer record each.
 *
 * Three kinds of program (docs/bpf.md, "The observer"):
 *  - tp_btf/mark_victim (required): the kernel marks a task as an OOM victim.
 *    Reached through the BTF tracepoint, not tracefs (`tp/oom/mark_victim`
 *    needs tracefs mounted, which this machine kind does not have). Runs in
 *    the context of the task doing the OOM; writes one `struct ow_kill`.
 *  - fentry/out_of_memory + fexit/out_of_memory (optional, together): keep
 *    the `struct oom_control *` of the OOM in progress in `ow_ooms`, keyed by
 *    the thread that runs it, so that the record can say where memory ran out
 *    (the OOM's memcg, the constraint, totalpages, the chosen task's points).
 *    Every call of mark_oom_victim() is inside out_of_memory(): the shortcut
 *    for an OOMing task that is already exiting, the chosen victim, the
 *    members of a memory.oom.group, and the chosen task found exiting.
 *  - fentry/__oom_kill_process (optional): the process about to get SIGKILL
 *    from the OOM killer; a marked task that did not pass here was exiting
 *    already and is not killed (the kernel does not count it in oom_kill).
 *
 * Where fentry programs cannot be loaded (measured on this machine kind: the
 * kernel refuses every fentry/fexit program with EPERM, and it has no
 * kprobes), the record names the OOM's memcg another way: the deepest memory
 * cgroup of the charging context (current's active_memcg, else the memcg of
 * its mm's owner, else its own) whose usage is within OW_SLACK pages of its
 * limit (memory, or memory+swap on v1): where try_charge() failed. None at
 * its limit: not a memcg OOM (a system one). Flagged OW_K_AT_LIMIT, so that
 * user space says the domain was inferred, not read from the oom_control.
 *
 * Bounded and allocation-free: one loop of at most OW_MAX_DEPTH levels,
 * fixed-size map entries, one ring buffer reservation per event (a full ring
 * buffer counts in `ow_lost`).
 * The layout of `struct ow_kill` must match src/oomwarden/observer.py.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define OW_KILL_MAGIC 0x314b574fu /* "OWK1" little endian */

/* flags */
#define OW_K_HAS_OC 0x01u     /* the OOM in progress was found: its fields are set */
#define OW_K_KILLED 0x02u     /* the process went through __oom_kill_process() */
#define OW_K_HAS_MM 0x04u     /* the victim still had an mm: rss fields are set */
#define OW_K_HAS_SIGNAL 0x08u /* oom_score_adj is set */
#define OW_K_CURRENT 0x10u    /* the victim is the task doing the OOM */
#define OW_K_AT_LIMIT 0x20u   /* no oom_control: oom_memcg_ino is the memcg found at its limit */

/* A memcg whose usage is this close to its limit is "at" it: the failed
 * charge was at most MEMCG_CHARGE_BATCH (64) pages. */
#define OW_SLACK 64
/* Deeper memory cgroups than this are not looked at. */
#define OW_MAX_DEPTH 32
/* A limit above this many pages is no limit (PAGE_COUNTER_MAX is ~2^51). */
#define OW_NO_LIMIT (1ULL << 50)

/* constraint: fixed codes, whatever the kernel's enum values are */
#define OW_C_UNKNOWN -1
#define OW_C_NONE 0
#define OW_C_CPUSET 1
#define OW_C_MEMORY_POLICY 2
#define OW_C_MEMCG 3

struct ow_kill {
	__u32 magic;
	__u32 flags;
	__u64 time_ns;        /* bpf_ktime_get_boot_ns() */
	__s32 pid;            /* the marked thread */
	__s32 tgid;           /* its process */
	__u32 uid;            /* as the tracepoint gives it (cred->uid) */
	__s32 oom_pid;        /* the thread doing the OOM (current) */
	__s32 oom_tgid;
	__s32 chosen_tgid;    /* oc->chosen's process, 0 if none yet */
	__s32 constraint;     /* OW_C_* */
	__s32 order;          /* oc->order */
	__u64 memcg_ino;      /* kernfs id of the victim's memory-controller cgroup */
	__u64 dfl_ino;        /* kernfs id of the victim's cgroup on the v2 hierarchy */
	__u64 oom_memcg_ino;  /* kernfs id of oc->memcg's cgroup, 0: not a memcg OOM */
	__s64 chosen_points;  /* oc->chosen_points */
	__u64 totalpages;     /* oc->totalpages */
	__u64 oom_limit;      /* the OOM memcg's memory.max in pages (the memsw limit if that one was hit) */
	__s64 rss_file;       /* percpu_counter.count, unsummed (get_mm_counter() before its clamp) */
	__s64 rss_anon;
	__s64 rss_shmem;
	__s64 swapents;
	__s64 pgtables_bytes;
	__s16 oom_score_adj;
	__u16 pad0;
	__u32 pad1;
	char comm[16];        /* the victim process's (its leader's) comm */
	char oom_comm[16];    /* the OOMing task's comm */
};

_Static_assert(sizeof(struct ow_kill) == 176, "struct ow_kill must stay 176 bytes");

/* The OOM in progress, per thread running out_of_memory(). */
struct ow_oom {
	__u64 oc;        /* struct oom_control *, read only while that call runs */
	__s32 kill_tgid; /* the process __oom_kill_process() was last entered for */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} ow_kills SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct ow_oom);
} ow_ooms SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ow_lost SEC(".maps");

static __always_inline __u64 cgrp_ino(struct cgroup *cgrp)
{
	if (!cgrp)
		return 0;
	return BPF_CORE_READ(cgrp, kn, id);
}

static __always_inline __u32 current_tid(void)
{
	return (__u32)bpf_get_current_pid_tgid();
}

SEC("fentry/out_of_memory")
int BPF_PROG(ow_oom_enter, struct oom_control *oc)
{
	struct ow_oom state = {};
	__u32 tid = current_tid();

	state.oc = (__u64)oc;
	bpf_map_update_elem(&ow_ooms, &tid, &state, BPF_ANY);
	return 0;
}

SEC("fexit/out_of_memory")
int BPF_PROG(ow_oom_exit, struct oom_control *oc, bool ret)
{
	__u32 tid = current_tid();

	bpf_map_delete_elem(&ow_ooms, &tid);
	return 0;
}

SEC("fentry/__oom_kill_process")
int BPF_PROG(ow_oom_kill, struct task_struct *victim, const char *message)
{
	__u32 tid = current_tid();
	struct ow_oom *state = bpf_map_lookup_elem(&ow_ooms, &tid);

	if (state)
		state->kill_tgid = BPF_CORE_READ(victim, tgid);
	return 0;
}

static __always_inline __s32 constraint_code(__u32 raw)
{
	if (raw == bpf_core_enum_value(enum oom_constraint, CONSTRAINT_NONE))
		return OW_C_NONE;
	if (raw == bpf_core_enum_value(enum oom_constraint, CONSTRAINT_CPUSET))
		return OW_C_CPUSET;
	if (raw == bpf_core_enum_value(enum oom_constraint, CONSTRAINT_MEMORY_POLICY))
		return OW_C_MEMORY_POLICY;
	if (raw == bpf_core_enum_value(enum oom_constraint, CONSTRAINT_MEMCG))
		return OW_C_MEMCG;
	return OW_C_UNKNOWN;
}

static __always_inline struct mem_cgroup *task_memcg(struct task_struct *task)
{
	int mem_id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);

	if (mem_id < 0 || mem_id >= 16)
		return NULL;
	/* css is the first member of struct mem_cgroup */
	return (struct mem_cgroup *)BPF_CORE_READ(task, cgroups, subsys[mem_id]);
}

/* 0 if not at its limit, else the limit (pages) it is at. */
static __always_inline __u64 at_limit(struct mem_cgroup *memcg, int v1)
{
	__u64 max, usage;

	max = BPF_CORE_READ(memcg, memory.max);
	usage = BPF_CORE_READ(memcg, memory.usage.counter);
	if (max < OW_NO_LIMIT && usage + OW_SLACK >= max)
		return max;
	if (!v1)
		return 0;
	max = BPF_CORE_READ(memcg, memsw.max);
	usage = BPF_CORE_READ(memcg, memsw.usage.counter);
	if (max < OW_NO_LIMIT && usage + OW_SLACK >= max)
		return max;
	return 0;
}

static __always_inline void find_at_limit(struct ow_kill *rec)
{
	struct task_struct *cur = (struct task_struct *)bpf_get_current_task_btf();
	struct mem_cgroup *memcg = BPF_CORE_READ(cur, active_memcg);
	struct task_struct *owner;
	struct cgroup_subsys_state *parent;
	__u64 limit;
	int v1, i;

	if (!memcg) {
		owner = BPF_CORE_READ(cur, mm, owner);
		memcg = task_memcg(owner ? owner : cur);
	}
	if (!memcg)
		return;
	/* the default (v2) hierarchy is number 0; v1 ones count from 1 */
	v1 = BPF_CORE_READ(memcg, css.cgroup, root, hierarchy_id) != 0;
	for (i = 0; i < OW_MAX_DEPTH; i++) {
		parent = BPF_CORE_READ(memcg, css.parent);
		if (!parent)
			return; /* the root memcg: no limit of its own */
		limit = at_limit(memcg, v1);
		if (limit) {
			rec->flags |= OW_K_AT_LIMIT;
			rec->oom_memcg_ino = cgrp_ino(BPF_CORE_READ(memcg, css.cgroup));
			rec->oom_limit = limit;
			return;
		}
		memcg = (struct mem_cgroup *)parent;
	}
}

static __always_inline void fill_oom(struct ow_kill *rec, struct ow_oom *state)
{
	struct oom_control *oc = (struct oom_control *)state->oc;
	struct mem_cgroup *memcg;
	struct task_struct *chosen;

	rec->flags |= OW_K_HAS_OC;
	if (state->kill_tgid && state->kill_tgid == rec->tgid)
		rec->flags |= OW_K_KILLED;
	memcg = BPF_CORE_READ(oc, memcg);
	if (memcg) {
		rec->oom_memcg_ino = cgrp_ino(BPF_CORE_READ(memcg, css.cgroup));
		rec->oom_limit = BPF_CORE_READ(memcg, memory.max);
	}
	chosen = BPF_CORE_READ(oc, chosen);
	/* select_bad_process() may leave (void *)-1 there: an abort */
	if (chosen && (long)chosen != -1)
		rec->chosen_tgid = BPF_CORE_READ(chosen, tgid);
	rec->chosen_points = BPF_CORE_READ(oc, chosen_points);
	rec->totalpages = BPF_CORE_READ(oc, totalpages);
	rec->order = BPF_CORE_READ(oc, order);
	rec->constraint = constraint_code((__u32)BPF_CORE_READ(oc, constraint));
}

SEC("tp_btf/mark_victim")
int BPF_PROG(ow_mark_victim, struct task_struct *task, uid_t uid)
{
	struct task_struct *leader;
	struct mm_struct *mm;
	struct css_set *cset;
	struct cgroup_subsys_state *css;
	struct ow_oom *state;
	struct ow_kill *rec;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	__u32 zero = 0;
	__u64 *lost;
	int mem_id;

	rec = bpf_ringbuf_reserve(&ow_kills, sizeof(*rec), 0);
	if (!rec) {
		lost = bpf_map_lookup_elem(&ow_lost, &zero);
		if (lost)
			__sync_fetch_and_add(lost, 1);
		return 0;
	}
	__builtin_memset(rec, 0, sizeof(*rec));
	rec->magic = OW_KILL_MAGIC;
	rec->time_ns = bpf_ktime_get_boot_ns();
	rec->pid = BPF_CORE_READ(task, pid);
	rec->tgid = BPF_CORE_READ(task, tgid);
	rec->uid = uid;
	rec->oom_pid = (__s32)tid;
	rec->oom_tgid = (__s32)(pid_tgid >> 32);
	rec->constraint = OW_C_UNKNOWN;
	bpf_get_current_comm(&rec->oom_comm, sizeof(rec->oom_comm));
	if ((__u32)rec->pid == tid)
		rec->flags |= OW_K_CURRENT;
	leader = BPF_CORE_READ(task, group_leader);
	if (leader)
		BPF_CORE_READ_STR_INTO(&rec->comm, leader, comm);
	else
		BPF_CORE_READ_STR_INTO(&rec->comm, task, comm);

	if (BPF_CORE_READ(task, signal)) {
		rec->oom_score_adj = BPF_CORE_READ(task, signal, oom_score_adj);
		rec->flags |= OW_K_HAS_SIGNAL;
	}
	cset = BPF_CORE_READ(task, cgroups);
	if (cset) {
		mem_id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
		if (mem_id >= 0 && mem_id < 16) {
			css = BPF_CORE_READ(cset, subsys[mem_id]);
			if (css)
				rec->memcg_ino = cgrp_ino(BPF_CORE_READ(css, cgroup));
		}
		rec->dfl_ino = cgrp_ino(BPF_CORE_READ(cset, dfl_cgrp));
	}
	mm = BPF_CORE_READ(task, mm);
	if (mm) {
		rec->flags |= OW_K_HAS_MM;
		rec->rss_file = BPF_CORE_READ(mm, rss_stat[MM_FILEPAGES].count);
		rec->rss_anon = BPF_CORE_READ(mm, rss_stat[MM_ANONPAGES].count);
		rec->rss_shmem = BPF_CORE_READ(mm, rss_stat[MM_SHMEMPAGES].count);
		rec->swapents = BPF_CORE_READ(mm, rss_stat[MM_SWAPENTS].count);
		rec->pgtables_bytes = BPF_CORE_READ(mm, pgtables_bytes.counter);
	}
	state = bpf_map_lookup_elem(&ow_ooms, &tid);
	if (state && state->oc)
		fill_oom(rec, state);
	else
		find_at_limit(rec);
	bpf_ringbuf_submit(rec, 0);
	return 0;
}
