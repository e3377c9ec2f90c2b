/* jasper_structs.h: map keys and values shared by the eBPF programs and ebpf/structs.py. */
#ifndef JASPER_STRUCTS_H
#define JASPER_STRUCTS_H

#include <linux/types.h>
#include "jasper_consts.h"

/* One copy destination of the relay. Addresses and ports in network byte order. User space packs
 * the same layout with TARGET in ebpf/structs.py; tests/test_ebpf_wire_layout.py checks its size
 * and offsets. */
struct jasper_target {
	__u32 ifindex;  /* egress interface of the copy */
	__u32 daddr;    /* destination IPv4 */
	__u32 saddr;    /* source IPv4; 0 = the address the packet was sent to (the relay's own) */
	__u16 dport;    /* destination UDP port */
	__u16 sport;    /* source UDP port: the relay's listen port, as the user-space relay sends */
	__u8 dmac[6];   /* next hop MAC (unused with JASPER_TARGET_FIB) */
	__u8 smac[6];   /* egress interface MAC */
	__u8 flags;     /* JASPER_TARGET_* */
	__u8 pad[3];
};
_Static_assert(sizeof(struct jasper_target) == 32, "jasper_target size");

/* The whole target table is one value of a one-entry hash map: an update swaps the element in one
 * step (RCU), so a packet sees either the old table or the new one, never half of each. */
struct jasper_target_table {
	__u16 listen_port; /* network byte order; UDP destination port the relay listens on */
	__u16 count;       /* targets in use, <= JASPER_MAX_TARGETS */
	__u32 flags;       /* JASPER_TABLE_* */
	struct jasper_target targets[JASPER_MAX_TARGETS];
};
_Static_assert(sizeof(struct jasper_target_table) == 8 + 32 * JASPER_MAX_TARGETS,
	       "jasper_target_table size");

/* Receiver allow-list key: a parent's source address and port (port 0 = any port). */
struct jasper_parent_key {
	__u32 saddr; /* network byte order */
	__u16 sport; /* network byte order, 0 = any */
	__u16 pad;
};
_Static_assert(sizeof(struct jasper_parent_key) == 8, "jasper_parent_key size");

#endif /* JASPER_STRUCTS_H */
