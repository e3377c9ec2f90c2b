/* jasper_consts.h: sizes, counter indices, marks and protocol numbers of the Jasper eBPF programs. */
#ifndef JASPER_CONSTS_H
#define JASPER_CONSTS_H

/* Sizes are macros so a build can override them with -D; the loader reads them back from BTF
 * map definitions, never from a second copy in Python. */
#ifndef JASPER_MAX_TARGETS
#define JASPER_MAX_TARGETS 64 /* >= F*(H+1) = 30 with F=10, H=2; room for wider fan-outs */
#endif
#ifndef JASPER_RING_SLOTS
#define JASPER_RING_SLOTS 65536 /* power of two: slot = hash & (SLOTS - 1) */
#endif
#ifndef JASPER_MAX_STREAMS
#define JASPER_MAX_STREAMS 64 /* streams (trees) one relay node forwards with their own table */
#endif
#ifndef JASPER_MAX_PARENTS
#define JASPER_MAX_PARENTS 256
#endif
#ifndef JASPER_MAX_PORTS
#define JASPER_MAX_PORTS 1024
#endif
#define JASPER_CAS_TRIES 4

_Static_assert(JASPER_MAX_TARGETS >= 30, "a relay needs at least F*(H+1) = 30 targets");
_Static_assert((JASPER_RING_SLOTS & (JASPER_RING_SLOTS - 1)) == 0, "ring slots: a power of two");

/* Every clone a relay sends carries JASPER_CLONE_MARK | its listen port, so that if it comes
 * back through that relay's hook (loopback, a hairpin) it is passed, never copied again. A
 * clone made by another relay node sharing the interface (several nodes on `lo`) carries that
 * node's port and is a real arrival. */
#define JASPER_CLONE_MARK 0x4A530000
#define JASPER_CLONE_MARK_MASK 0xFFFF0000

/* Target flags (struct jasper_target.flags). */
#define JASPER_TARGET_HEDGE 0x01   /* set FLAG_HEDGE_COPY in the copy */
#define JASPER_TARGET_FIB 0x02     /* no static MAC known: resolve with bpf_fib_lookup per packet */

/* Target table flags (struct jasper_target_table.flags). */
#define JASPER_TABLE_CSUM_HELPERS 0x01 /* patch UDP checksums with bpf_l4_csum_replace only */

/* Relay counters: indices into the per-CPU array jasper_relay_stats. Keep in step with
 * RELAY_COUNTERS in ebpf/structs.py (tests/test_ebpf_wire_layout.py checks the counts agree). */
enum jasper_relay_counter {
	RELAY_IN = 0,        /* Jasper data packets to the listen port, valid or not */
	RELAY_COPIES,        /* clones sent */
	RELAY_DUPLICATES,    /* second and later copies of a message, dropped */
	RELAY_MALFORMED,     /* to the listen port but not a valid Jasper datagram, dropped */
	RELAY_NO_NEIGHBOUR,  /* a target whose next hop MAC is unknown, copy skipped */
	RELAY_FIB_FALLBACK,  /* copies whose MAC came from bpf_fib_lookup instead of the map */
	RELAY_CLONE_FAILED,  /* bpf_clone_redirect made no clone (or a rewrite failed) */
	RELAY_NO_TARGETS,    /* valid packet but no target table configured, dropped */
	RELAY_PASSED,        /* not for us (other protocol or port), passed to the stack */
	RELAY_CLONE_SEEN,    /* one of our own clones came back, passed untouched */
	RELAY_COUNTER_MAX,
};

/* Receiver counters: indices into jasper_receiver_stats; RECEIVER_COUNTERS in ebpf/structs.py. */
enum jasper_receiver_counter {
	RECV_IN = 0,        /* UDP packets to one of the endpoint ports */
	RECV_ACCEPTED,      /* first copy from a parent, passed to the socket */
	RECV_DUPLICATES,    /* hedged or repeated copy, dropped */
	RECV_NOT_PARENT,    /* source not in the parent allow-list, dropped */
	RECV_MALFORMED,     /* not a valid Jasper datagram, dropped */
	RECV_PASSED,        /* not for an endpoint port, passed untouched */
	RECV_COUNTER_MAX,
};

#define IPPROTO_UDP_NUM 17

#endif /* JASPER_CONSTS_H */
