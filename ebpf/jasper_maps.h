/* jasper_maps.h: BTF-style map definitions of the relay and receiver programs, pinned by name. */
#ifndef JASPER_MAPS_H
#define JASPER_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "jasper_consts.h"
#include "jasper_structs.h"

#ifdef JASPER_RELAY
/* Key 0 -> the whole target table. A hash map without preallocation so that an update replaces
 * the element under RCU: readers see the old or the new table, never a mix. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct jasper_target_table);
} relay_targets SEC(".maps");

/* Stream id -> that stream's target table, for a relay node in several trees: a copy of a
 * stream listed here follows its stream's table, any other the table above. Elements are
 * swapped whole under RCU, like the one above. The listen port and table flags are the node's
 * and are read from the table above. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, JASPER_MAX_STREAMS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct jasper_target_table);
} relay_streams SEC(".maps");

/* Duplicate ring shared by every CPU (a per-CPU ring would let two CPUs each forward one copy of
 * a hedged message). Slots hold a 64-bit fingerprint of (stream, session, seq), swapped with
 * compare-and-swap. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, JASPER_RING_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} relay_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RELAY_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} relay_stats SEC(".maps");
#endif /* JASPER_RELAY */

#ifdef JASPER_RECEIVER
/* Endpoint ports (network byte order) whose traffic the program filters; others pass. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, JASPER_MAX_PORTS);
	__type(key, __u16);
	__type(value, __u8);
} recv_ports SEC(".maps");

/* Parent allow-list: (source IPv4, source port or 0 for any). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, JASPER_MAX_PARENTS);
	__type(key, struct jasper_parent_key);
	__type(value, __u8);
} recv_parents SEC(".maps");

/* Duplicate ring over (destination port, stream, session, seq), shared by every CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, JASPER_RING_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} recv_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RECV_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} recv_stats SEC(".maps");
#endif /* JASPER_RECEIVER */

#endif /* JASPER_MAPS_H */
