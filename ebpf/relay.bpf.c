/* relay.bpf.c: TC ingress program of a relay: dedup, one clone per target, drop the original. */
#define JASPER_RELAY 1
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "jasper_wire.h"
#include "jasper_consts.h"
#include "jasper_structs.h"
#include "jasper_maps.h"
#include "jasper_helpers.h"

#define AF_INET_NUM 2
#define IP_CSUM_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, check))
#define IP_SADDR_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, daddr))

/* Per-packet tallies, added to the per-CPU counters once, at the single exit. */
struct relay_tally {
	__u64 in, copies, duplicates, malformed, no_neighbour, fib_fallback, clone_failed,
		no_targets, passed, clone_seen;
};

/* What the packet currently holds: clones are made from one skb rewritten target after target, so
 * each rewrite patches the checksums from these values to the target's. */
struct relay_state {
	__u32 orig_daddr; /* the relay's address the packet came to: source of copies by default */
	__u32 l4_off;
	__u32 jh_off;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u16 ver_flags;
	__u16 ip_tot_len;
	__u64 mac_lo; /* Ethernet destination and source now in the packet, as 8 + 4 bytes */
	__u32 mac_hi;
	__u32 mac_known; /* 0 until the first target's addresses are written */
};

static __always_inline int relay_rewrite_l3l4(struct __sk_buff *skb, struct relay_state *s,
					      const struct jasper_target *t, __u8 new_flags)
{
	__u32 udp_csum_off = s->l4_off + offsetof(struct udphdr, check);
	/* BPF_F_MARK_MANGLED_0: a zero UDP checksum means "none" and stays zero; a computed zero is
	 * written as 0xFFFF. */
	__u64 l4_flags = BPF_F_MARK_MANGLED_0;
	/* saddr 0: send from the address the packet came to, as a socket bound to it would. */
	__u32 saddr = t->saddr ? t->saddr : s->orig_daddr;

	if (t->daddr != s->daddr) {
		if (bpf_l4_csum_replace(skb, udp_csum_off, s->daddr, t->daddr,
					l4_flags | BPF_F_PSEUDO_HDR | sizeof(__u32)) ||
		    bpf_l3_csum_replace(skb, IP_CSUM_OFF, s->daddr, t->daddr, sizeof(__u32)) ||
		    bpf_skb_store_bytes(skb, IP_DADDR_OFF, &t->daddr, sizeof(__u32), 0))
			return -1;
		s->daddr = t->daddr;
	}
	if (saddr != s->saddr) {
		if (bpf_l4_csum_replace(skb, udp_csum_off, s->saddr, saddr,
					l4_flags | BPF_F_PSEUDO_HDR | sizeof(__u32)) ||
		    bpf_l3_csum_replace(skb, IP_CSUM_OFF, s->saddr, saddr, sizeof(__u32)) ||
		    bpf_skb_store_bytes(skb, IP_SADDR_OFF, &saddr, sizeof(__u32), 0))
			return -1;
		s->saddr = saddr;
	}
	if (t->dport != s->dport) {
		if (bpf_l4_csum_replace(skb, udp_csum_off, s->dport, t->dport,
					l4_flags | sizeof(__u16)) ||
		    bpf_skb_store_bytes(skb, s->l4_off + offsetof(struct udphdr, dest), &t->dport,
					sizeof(__u16), 0))
			return -1;
		s->dport = t->dport;
	}
	if (t->sport != s->sport) {
		if (bpf_l4_csum_replace(skb, udp_csum_off, s->sport, t->sport,
					l4_flags | sizeof(__u16)) ||
		    bpf_skb_store_bytes(skb, s->l4_off + offsetof(struct udphdr, source), &t->sport,
					sizeof(__u16), 0))
			return -1;
		s->sport = t->sport;
	}
	/* The hedge flag shares a 16-bit checksum word with the version byte. */
	__u16 ver_flags = bpf_htons((bpf_ntohs(s->ver_flags) & 0xFF00) | new_flags);
	if (ver_flags != s->ver_flags) {
		if (bpf_l4_csum_replace(skb, udp_csum_off, s->ver_flags, ver_flags,
					l4_flags | sizeof(__u16)) ||
		    bpf_skb_store_bytes(skb, s->jh_off + 3, &new_flags, 1, 0))
			return -1;
		s->ver_flags = ver_flags;
	}
	return 0;
}

/* Next hop MACs and egress interface: from the target table when the loader knew them (static
 * neighbour entries), else from the kernel FIB and neighbour table, per packet. */
static __always_inline int relay_resolve_l2(struct __sk_buff *skb, const struct relay_state *s,
					    const struct jasper_target *t, __u8 macs[12],
					    __u32 *ifindex, struct relay_tally *n)
{
	if (!(t->flags & JASPER_TARGET_FIB)) {
		__builtin_memcpy(macs, t->dmac, 6);
		__builtin_memcpy(macs + 6, t->smac, 6);
		*ifindex = t->ifindex;
		return 0;
	}
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET_NUM;
	fib.l4_protocol = IPPROTO_UDP_NUM;
	fib.tot_len = s->ip_tot_len;
	fib.ipv4_src = t->saddr ? t->saddr : s->orig_daddr;
	fib.ipv4_dst = t->daddr;
	/* An egress lookup from the relay's own address, like the route its socket would take; an
	 * ingress-perspective lookup would also demand IP forwarding on the relay. */
	fib.ifindex = t->ifindex;
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT) !=
	    BPF_FIB_LKUP_RET_SUCCESS) {
		n->no_neighbour++;
		return -1;
	}
	n->fib_fallback++;
	__builtin_memcpy(macs, fib.dmac, 6);
	__builtin_memcpy(macs + 6, fib.smac, 6);
	*ifindex = fib.ifindex;
	return 0;
}

static __always_inline void relay_fan_out(struct __sk_buff *skb, struct relay_state *s,
					  const struct jasper_target_table *table, __u8 orig_flags,
					  __u32 own_mark, struct relay_tally *n)
{
	__u32 count = table->count;
	__u8 base_flags = orig_flags & ~JASPER_FLAG_HEDGE_COPY;

	/* A clone is an exact copy of the skb: mark before cloning, so every clone carries it. */
	skb->mark = own_mark;
	for (__u32 i = 0; i < JASPER_MAX_TARGETS; i++) {
		if (i >= count)
			break;
		const struct jasper_target *t = &table->targets[i];
		__u8 macs[12];
		__u32 ifindex;
		if (relay_resolve_l2(skb, s, t, macs, &ifindex, n))
			continue;
		__u8 flags = base_flags | ((t->flags & JASPER_TARGET_HEDGE) ? JASPER_FLAG_HEDGE_COPY : 0);
		if (relay_rewrite_l3l4(skb, s, t, flags)) {
			n->clone_failed++;
			break;
		}
		/* Consecutive targets behind one MAC (ports of one host) skip the Ethernet write. */
		__u64 mac_lo;
		__u32 mac_hi;
		__builtin_memcpy(&mac_lo, macs, 8);
		__builtin_memcpy(&mac_hi, macs + 8, 4);
		if (!s->mac_known || mac_lo != s->mac_lo || mac_hi != s->mac_hi) {
			if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0)) {
				n->clone_failed++;
				break;
			}
			s->mac_lo = mac_lo;
			s->mac_hi = mac_hi;
			s->mac_known = 1;
		}
		/* Negative: no clone left (bad ifindex, no memory). A positive NET_XMIT_* code means
		 * the clone was handed to the device and its queue dropped it, as a socket's send
		 * would not notice either: that is a copy sent. */
		if (bpf_clone_redirect(skb, ifindex, 0) < 0)
			n->clone_failed++;
		else
			n->copies++;
		/* bpf_clone_redirect invalidates every packet pointer. The rewrites above go through
		 * helpers with offsets, but check that the headers we patch are still where we left
		 * them before touching the skb again. */
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		if (data + (s->jh_off & 0xFF) + JASPER_HEADER_LEN > data_end) {
			n->clone_failed++;
			break;
		}
	}
}

SEC("tc")
int jasper_relay(struct __sk_buff *skb)
{
	struct relay_tally n = {};
	/* TC_ACT_UNSPEC passes the packet on to the next filter (another relay node's or a
	 * receiver's program on the same interface, e.g. on loopback) and then to the stack. */
	int action = TC_ACT_UNSPEC;
	__u32 zero = 0;

	struct jasper_target_table *table = bpf_map_lookup_elem(&relay_targets, &zero);
	if (!table) {
		n.passed++;
		goto out;
	}
	__u32 own_mark = JASPER_CLONE_MARK | bpf_ntohs(table->listen_port);
	if (skb->mark == own_mark) {
		n.clone_seen++;
		goto out;
	}
	/* Make the headers linear so direct access sees them (a no-op when they already are). */
	if (skb->len >= JASPER_PARSE_SPAN)
		bpf_skb_pull_data(skb, JASPER_PARSE_SPAN);
	else
		bpf_skb_pull_data(skb, skb->len);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct jasper_parsed p = {};
	if (jasper_parse_udp(data, data_end, skb->len, &p) != JASPER_UDP ||
	    p.dport != table->listen_port) {
		n.passed++;
		goto out;
	}
	n.in++;
	if (jasper_parse_header(data, data_end, skb->len, &p) != JASPER_OK) {
		n.malformed++;
		action = TC_ACT_SHOT;
		goto out;
	}
	/* The user-space path never sees data packets in eBPF mode, forwarded or not. */
	action = TC_ACT_SHOT;
	__u64 extra = (p.flags & JASPER_FLAG_HEARTBEAT) ? 1 : 0;
	if (jasper_ring_seen(&relay_ring, jasper_slot(&p, extra), jasper_fingerprint(&p, extra))) {
		n.duplicates++;
		goto out;
	}
	if (!table->count) {
		n.no_targets++;
		goto out;
	}
	struct relay_state s = {
		.orig_daddr = p.daddr,
		.l4_off = p.l4_off,
		.jh_off = p.jh_off,
		.saddr = p.saddr,
		.daddr = p.daddr,
		.sport = p.sport,
		.dport = p.dport,
		.ver_flags = p.ver_flags,
		.ip_tot_len = p.ip_tot_len,
	};
	relay_fan_out(skb, &s, table, p.flags, own_mark, &n);

out:
	jasper_count(&relay_stats, RELAY_IN, n.in);
	jasper_count(&relay_stats, RELAY_COPIES, n.copies);
	jasper_count(&relay_stats, RELAY_DUPLICATES, n.duplicates);
	jasper_count(&relay_stats, RELAY_MALFORMED, n.malformed);
	jasper_count(&relay_stats, RELAY_NO_NEIGHBOUR, n.no_neighbour);
	jasper_count(&relay_stats, RELAY_FIB_FALLBACK, n.fib_fallback);
	jasper_count(&relay_stats, RELAY_CLONE_FAILED, n.clone_failed);
	jasper_count(&relay_stats, RELAY_NO_TARGETS, n.no_targets);
	jasper_count(&relay_stats, RELAY_PASSED, n.passed);
	jasper_count(&relay_stats, RELAY_CLONE_SEEN, n.clone_seen);
	return action;
}

char _license[] SEC("license") = "GPL";
