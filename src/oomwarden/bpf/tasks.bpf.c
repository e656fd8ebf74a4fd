// SPDX-License-Identifier: GPL-2.0-only
/*
 * oomwarden: one pass over every task, one fixed-size record per process.
 *
 * An iter/task program: reading the iterator's fd runs it once for every task
 * (every thread) of the system; it writes a `struct ow_task` with
 * bpf_seq_write() for each thread-group leader, and for a thread whose leader
 * has already dropped its mm while the thread still holds it (what the
 * kernel's find_lock_task_mm() would find). User space
 * (src/oomwarden/sources/bpf.py) decodes the records; the layout below must
 * match its struct format exactly (OW_MAGIC and the size are checked there).
 *
 * What is read, and how it relates to what the OOM killer reads
 * (mm/oom_kill.c, oom_badness()):
 *  - the rss counters: mm->rss_stat[] are percpu_counters; get_mm_counter()
 *    is percpu_counter_read_positive(), i.e. the shared `count` without the
 *    per-CPU deltas, clamped at 0. We copy `count` as it is (the clamp is done
 *    in user space), so file + anon + shmem is get_mm_rss() exactly as
 *    oom_badness() sees it at the moment of the read;
 *  - swap entries: the same for MM_SWAPENTS (oom_badness() reads it unsummed
 *    too);
 *  - page tables: mm->pgtables_bytes (mm_pgtables_bytes());
 *  - oom_score_adj: task->signal->oom_score_adj;
 *  - the kthread flag (PF_KTHREAD), and in_vfork(): vfork_done set and the
 *    same mm as the real parent.
 * Built against a vmlinux.h dumped from this kernel's BTF, with CO-RE
 * relocations (field offsets and enum values are fixed up at load time).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#define OW_MAGIC 0x3154574fu /* "OWT1" little endian */
#define OW_PF_KTHREAD 0x00200000u

/* rec_flags */
#define OW_HAS_MM 0x1u
#define OW_IN_VFORK 0x2u
#define OW_LEADER 0x4u
#define OW_HAS_SIGNAL 0x8u

struct ow_task {
	__u32 magic;
	__s32 pid;
	__s32 tgid;
	__s32 ppid;
	__u64 start_boottime; /* ns since boot, as /proc/PID/stat field 22 before the tick division */
	__u64 memcg_ino;      /* kernfs id of the memory controller's cgroup (v1 or v2), 0 if none */
	__u64 dfl_ino;        /* kernfs id of the task's cgroup on the v2 (default) hierarchy */
	__s64 rss_file;       /* percpu_counter.count, unsummed: get_mm_counter() before its clamp */
	__s64 rss_anon;
	__s64 rss_shmem;
	__s64 swapents;
	__s64 pgtables_bytes;
	__u32 uid;            /* cred->uid (real uid, as the Uid: line's first field) */
	__u32 state;          /* task->__state */
	__u32 exit_state;
	__u32 flags;          /* task->flags */
	__s16 oom_score_adj;
	__u16 rec_flags;
	char comm[16];
	__u32 pad;
};

static __always_inline __u64 cgrp_ino(struct cgroup *cgrp)
{
	if (!cgrp)
		return 0;
	return cgrp->kn->id;
}

/*
 * ctx->task is a trusted BTF pointer: the fields below are read with plain
 * loads (the verifier turns each into a fault-safe PROBE_MEM load, a NULL
 * read as 0) instead of one bpf_probe_read_kernel() call per field, which
 * halves the cost of a pass. CO-RE still relocates every offset (vmlinux.h
 * marks its types preserve_access_index).
 */
SEC("iter/task")
int dump_task(struct bpf_iter__task *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct task_struct *leader, *parent;
	struct mm_struct *mm;
	struct css_set *cset;
	struct cgroup_subsys_state *css;
	struct ow_task rec = {};
	int mem_id;

	if (!task)
		return 0;
	leader = task->group_leader;
	mm = task->mm;
	if (leader != task) {
		/* A thread stands in for its leader only when the leader has no mm
		 * any more and this thread still has one (find_lock_task_mm()). */
		if (!mm || leader->mm)
			return 0;
		if (task->flags & OW_PF_KTHREAD)
			return 0;
	} else {
		rec.rec_flags |= OW_LEADER;
	}

	rec.magic = OW_MAGIC;
	rec.pid = task->pid;
	rec.tgid = task->tgid;
	parent = task->real_parent;
	rec.ppid = parent ? parent->tgid : 0;
	rec.start_boottime = leader->start_boottime;
	rec.uid = task->cred->uid.val;
	rec.state = task->__state;
	rec.exit_state = task->exit_state;
	rec.flags = task->flags;
	bpf_probe_read_kernel_str(&rec.comm, sizeof(rec.comm), leader->comm);

	if (task->signal) {
		rec.oom_score_adj = task->signal->oom_score_adj;
		rec.rec_flags |= OW_HAS_SIGNAL;
	}

	cset = task->cgroups;
	if (cset) {
		mem_id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
		if (mem_id >= 0 && mem_id < 16) {
			css = cset->subsys[mem_id];
			if (css)
				rec.memcg_ino = cgrp_ino(css->cgroup);
		}
		rec.dfl_ino = cgrp_ino(cset->dfl_cgrp);
	}

	if (mm) {
		rec.rec_flags |= OW_HAS_MM;
		rec.rss_file = mm->rss_stat[MM_FILEPAGES].count;
		rec.rss_anon = mm->rss_stat[MM_ANONPAGES].count;
		rec.rss_shmem = mm->rss_stat[MM_SHMEMPAGES].count;
		rec.swapents = mm->rss_stat[MM_SWAPENTS].count;
		rec.pgtables_bytes = mm->pgtables_bytes.counter;
		if (task->vfork_done && parent && parent->mm == mm)
			rec.rec_flags |= OW_IN_VFORK;
	}

	bpf_seq_write(seq, &rec, sizeof(rec));
	return 0;
}
