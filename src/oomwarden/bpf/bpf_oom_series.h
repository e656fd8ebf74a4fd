/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * oomwarden: the declarations of the BPF OOM series that oom_ops.bpf.c needs
 * and that this kernel's vmlinux.h does not have (the series is not merged).
 *
 * Written from the interface of Roman Gushchin's "mm: BPF OOM", revision
 * bpf-next v3 (posted 2026-01-26, 17 patches; docs/bpf-oom.md says where it
 * was read and what it says). Only what the handler uses is declared, in our
 * own words:
 *
 *  - struct bpf_oom_ops: one callback, handle_out_of_memory(oc, st_link),
 *    called before the kernel's own victim selection, and a 64-byte policy
 *    name. It is declared here under a CO-RE "flavour" name,
 *    bpf_oom_ops___ow: libbpf (1.4 and later) drops a ___suffix when it
 *    matches a struct_ops type against the kernel's BTF, and a kernel whose
 *    vmlinux.h does define struct bpf_oom_ops meets no second definition of
 *    it here (no redefinition error, no build flag to set);
 *  - the kill kfunc bpf_oom_kill_process(oc, task, message): kills `task` as
 *    the kernel's OOM killer would (OOM reaper, memcg statistics,
 *    memory.oom.group) and marks the OOM as handled (oc->bpf_memory_freed);
 *    sleepable, so the handler is a "struct_ops.s" program;
 *  - bpf_task_is_oom_victim(task): whether the kernel already chose it (weak:
 *    the handler works without it, see oom_ops.bpf.c).
 *
 * A kfunc declared again by a future vmlinux.h with the same prototype is no
 * error in C; one whose prototype changed in a later revision is, and the
 * build then skips this object with one line (build.sh): the handler is
 * written against v3 and must be looked at again, not loaded blindly.
 */
#ifndef OOMWARDEN_BPF_OOM_SERIES_H
#define OOMWARDEN_BPF_OOM_SERIES_H

#define OW_BPF_OOM_NAME_MAX_LEN 64

struct bpf_oom_ops___ow {
	int (*handle_out_of_memory)(struct oom_control *oc,
				    struct bpf_struct_ops_link *st_link);
	char name[OW_BPF_OOM_NAME_MAX_LEN];
};

extern int bpf_oom_kill_process(struct oom_control *oc, struct task_struct *task,
				const char *message__str) __ksym;
extern bool bpf_task_is_oom_victim(struct task_struct *task) __ksym __weak;

/* Generic task kfuncs (in the kernel since 6.2; registered for struct_ops
 * programs too). */
extern struct task_struct *bpf_task_from_pid(s32 pid) __ksym;
extern void bpf_task_release(struct task_struct *p) __ksym;

/* libbpf 1.2 and later define it in bpf_helpers.h; Debian 12's 1.1 does not.
 * A weak ksym the kernel lacks resolves to 0, and the verifier drops the
 * branch that would call it. */
#ifndef bpf_ksym_exists
#define bpf_ksym_exists(sym) (!!(sym))
#endif

#endif /* OOMWARDEN_BPF_OOM_SERIES_H */
