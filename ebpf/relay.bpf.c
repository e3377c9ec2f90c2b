/* relay.bpf.c: TC ingress program of a relay: dedup, a clone per target, the original to the last. */
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

/* Per-packet tallies, added to the per-CPU counters once, at the single exit. */
struct relay_tally {
	__u64 in, copies, duplicates, malformed, no_neighbour, fib_fallback, clone_failed,
		no_targets, passed, clone_seen;
};

/* Ethernet, the fixed IPv4 header and the UDP ports as they are in the packet now: each copy
 * patches this stack copy and writes the fields that change. The leading pad puts the IP header
 * on a 4-byte boundary. */
struct relay_hdr {
	__u16 pad;
	__u8 dmac[6];
	__u8 smac[6];
	__u16 proto;
	struct iphdr ip;
	__u16 sport;
	__u16 dport;
};
_Static_assert(sizeof(struct relay_hdr) == 2 + ETH_HLEN + sizeof(struct iphdr) + 4, "relay_hdr");
#define RELAY_HDR_FIXED (ETH_HLEN + sizeof(struct iphdr)) /* Ethernet + IPv4 without options */

/* What the packet currently holds: copies are made from one skb rewritten target after target,
 * so each rewrite patches the checksums from these values to the target's. */
struct relay_state {
	struct relay_hdr h;
	__u32 orig_daddr; /* the relay's address the packet came to: source of copies by default */
	__u32 l4_off;
	__u32 jh_off;
	__u16 ver_flags; /* raw 16-bit word holding the Jasper version and flags */
	__u16 ip_tot_len;
	__u16 udp_check; /* raw UDP checksum field now in the packet (modes FULL and SEED) */
	__u16 csum_mode; /* enum relay_csum_mode */
};

/* What the UDP checksum field of this skb holds, which decides how it follows a rewrite. It is the
 * kernel's skb->ip_summed, which a TC program cannot read, so relay_csum_mode asks the helpers. */
enum relay_csum_mode {
	/* CHECKSUM_NONE or _UNNECESSARY (what a NIC hands over): the datagram's full checksum,
	 * patched here for addresses, ports and flags alike. */
	RELAY_CSUM_FULL = 0,
	/* CHECKSUM_PARTIAL (sent by a local socket, on lo or veth): the pseudo-header sum that the
	 * device or the stack completes later, patched here for address changes only. */
	RELAY_CSUM_SEED,
	/* CHECKSUM_COMPLETE, or the table asks for it: skb->csum must follow the pseudo-header too,
	 * so the kernel's bpf_l4_csum_replace does the patching. */
	RELAY_CSUM_HELPERS,
};

/* Ones' complement arithmetic (RFC 1071/1624) on raw network-order words: the sum does not depend
 * on byte order. A difference is ~old + new, word by word; the 32-bit accumulator never overflows
 * for the few words a copy changes. csum_add32 and csum_fold are the kernel's csum_add and
 * csum_fold, so results equal what bpf_l4_csum_replace would write. */
static __always_inline __u32 csum_diff16(__u16 old, __u16 new)
{
	return (__u32)(__u16)~old + new;
}

static __always_inline __u32 csum_diff32(__u32 old, __u32 new)
{
	return csum_diff16(old >> 16, new >> 16) + csum_diff16(old & 0xFFFF, new & 0xFFFF);
}

static __always_inline __u32 csum_add32(__u32 a, __u32 b)
{
	__u32 r = a + b;
	return r + (r < b); /* end-around carry */
}

/* The kernel's csum_fold: fold to 16 bits and complement. */
static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return (__u16)~sum;
}

/* Which enum relay_csum_mode this skb is in; once per packet, before the first rewrite. Negative
 * when the probe could not put the checksum field back (the packet must then be dropped). */
static __always_inline int relay_csum_mode(struct __sk_buff *skb, struct relay_state *s,
					   __u32 table_flags)
{
	if (table_flags & JASPER_TABLE_CSUM_HELPERS)
		return RELAY_CSUM_HELPERS;
	/* Only a CHECKSUM_COMPLETE skb takes bpf_csum_update; adding 0 changes nothing. */
	if (bpf_csum_update(skb, 0) >= 0)
		return RELAY_CSUM_HELPERS;
	__u32 off = (s->l4_off & 0x7F) + offsetof(struct udphdr, check);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + off + 2 > data_end)
		return RELAY_CSUM_HELPERS;
	__u16 before = *(__u16 *)(data + off);
	/* Without BPF_F_PSEUDO_HDR the helper leaves a CHECKSUM_PARTIAL skb's field alone and
	 * patches any other: add 1, see whether the field moved, put it back. */
	if (bpf_l4_csum_replace(skb, off, 0, 1, 0))
		return RELAY_CSUM_HELPERS;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + off + 2 > data_end)
		return -1;
	__u16 after = *(__u16 *)(data + off);
	*(__u16 *)(data + off) = before;
	s->udp_check = before;
	return after == before ? RELAY_CSUM_SEED : RELAY_CSUM_FULL;
}

/* Patch the stack copy of the headers for target `t` and write what changed into the packet. The
 * IP checksum is computed here (it covers the IP header only, whatever the skb's checksum state);
 * the UDP checksum too, from the differences of addresses (pseudo-header), ports and flags, as
 * the skb's checksum mode wants it, or by bpf_l4_csum_replace in mode RELAY_CSUM_HELPERS. */
static __always_inline int relay_rewrite(struct __sk_buff *skb, struct relay_state *s,
					 const struct jasper_target *t, const __u8 macs[12],
					 __u8 new_flags)
{
	struct relay_hdr *h = &s->h;
	__u32 udp_csum_off = s->l4_off + offsetof(struct udphdr, check);
	/* saddr 0: send from the address the packet came to, as a socket bound to it would. */
	__u32 saddr = t->saddr ? t->saddr : s->orig_daddr;
	__u32 d_addr = 0, d_data = 0;
	int addr_changed = 0, data_changed = 0;

	if (t->daddr != h->ip.daddr) {
		d_addr += csum_diff32(h->ip.daddr, t->daddr);
		h->ip.daddr = t->daddr;
		addr_changed = 1;
	}
	if (saddr != h->ip.saddr) {
		d_addr += csum_diff32(h->ip.saddr, saddr);
		h->ip.saddr = saddr;
		addr_changed = 1;
	}
	if (addr_changed)
		h->ip.check = csum_fold(csum_add32(d_addr, ~(__u32)h->ip.check));
	if (t->dport != h->dport) {
		d_data += csum_diff16(h->dport, t->dport);
		h->dport = t->dport;
		data_changed = 1;
	}
	if (t->sport != h->sport) {
		d_data += csum_diff16(h->sport, t->sport);
		h->sport = t->sport;
		data_changed = 1;
	}
	/* The hedge flag shares a 16-bit checksum word with the version byte. */
	__u16 ver_flags = bpf_htons((bpf_ntohs(s->ver_flags) & 0xFF00) | new_flags);
	int flags_changed = ver_flags != s->ver_flags;
	if (flags_changed) {
		d_data += csum_diff16(s->ver_flags, ver_flags);
		s->ver_flags = ver_flags;
		data_changed = 1;
	}
	/* Direct writes: the skb's head is private here (the verifier's prologue uncloned it, and
	 * bpf_clone_redirect uncloned it again after each clone), so no helper call is needed. */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 l4_off = s->l4_off & 0x7F; /* <= 14 + 60: bounded for the verifier */
	if (data + RELAY_HDR_FIXED > data_end || data + l4_off + sizeof(struct udphdr) > data_end)
		return -1;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct udphdr *udp = data + l4_off;
	__builtin_memcpy(eth->h_dest, macs, 12);
	ip->saddr = h->ip.saddr;
	ip->daddr = h->ip.daddr;
	ip->check = h->ip.check;
	udp->source = h->sport;
	udp->dest = h->dport;
	if (flags_changed) {
		__u32 flags_off = s->jh_off & 0xFF;
		if (data + flags_off + 4 > data_end)
			return -1;
		*(__u8 *)(data + flags_off + 3) = new_flags;
	}
	/* A zero UDP checksum means "none" and stays zero; a computed zero is written as 0xFFFF
	 * (what BPF_F_MARK_MANGLED_0 does in the helper). */
	if (s->csum_mode == RELAY_CSUM_HELPERS) {
		/* Size 0: `to` is a checksum difference. */
		if (addr_changed && bpf_l4_csum_replace(skb, udp_csum_off, 0, d_addr,
							BPF_F_MARK_MANGLED_0 | BPF_F_PSEUDO_HDR))
			return -1;
		if (data_changed &&
		    bpf_l4_csum_replace(skb, udp_csum_off, 0, d_data, BPF_F_MARK_MANGLED_0))
			return -1;
		return 0;
	}
	__u16 check = s->udp_check;
	if (check) {
		if (s->csum_mode == RELAY_CSUM_FULL)
			check = csum_fold(csum_add32(d_addr + d_data, ~(__u32)check));
		else /* SEED: ports and flags are summed when the datagram is completed */
			check = (__u16)~csum_fold(csum_add32((__u32)check, d_addr));
		if (!check)
			check = 0xFFFF;
		s->udp_check = check;
	}
	udp->check = check;
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

/* One copy per target. Every target but the last gets a clone (bpf_clone_redirect); the last one
 * gets the packet itself (bpf_redirect, TC_ACT_REDIRECT), which saves a clone and the unsharing
 * copy of the header that bpf_clone_redirect makes after each clone. Returns the action. */
static __always_inline int relay_fan_out(struct __sk_buff *skb, struct relay_state *s,
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
		if (relay_rewrite(skb, s, t, macs, flags)) {
			n->clone_failed++;
			break;
		}
		if (i + 1 == count) {
			/* The original leaves as the last copy: TC_ACT_REDIRECT once we return. */
			if (bpf_redirect(ifindex, 0) == TC_ACT_REDIRECT) {
				n->copies++;
				return TC_ACT_REDIRECT;
			}
			n->clone_failed++;
			break;
		}
		/* Negative: no clone left (bad ifindex, no memory). A positive NET_XMIT_* code means
		 * the clone was handed to the device and its queue dropped it, as a socket's send
		 * would not notice either: that is a copy sent. */
		if (bpf_clone_redirect(skb, ifindex, 0) < 0)
			n->clone_failed++;
		else
			n->copies++;
		/* bpf_clone_redirect invalidates every packet pointer (and unclones our head): the
		 * next rewrite re-derives them; check here that the headers we patch are still
		 * where we left them before touching the skb again. */
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		if (data + (s->jh_off & 0xFF) + JASPER_HEADER_LEN > data_end) {
			n->clone_failed++;
			break;
		}
	}
	/* No target left for the original (the last one had no neighbour, or a rewrite failed). */
	return TC_ACT_SHOT;
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
	/* Make the headers linear so direct access sees them; most packets already are, and the
	 * check spares them a helper call. */
	__u32 span = skb->len < JASPER_PARSE_SPAN ? skb->len : JASPER_PARSE_SPAN;
	if ((long)skb->data_end - (long)skb->data < (long)span)
		bpf_skb_pull_data(skb, span);

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
	/* A relay in several trees: the copy's stream picks its own table. */
	__u32 stream_id = p.stream_id;
	struct jasper_target_table *targets = bpf_map_lookup_elem(&relay_streams, &stream_id);
	if (!targets)
		targets = table;
	if (!targets->count) {
		n.no_targets++;
		goto out;
	}
	struct relay_state s = {
		.orig_daddr = p.daddr,
		.l4_off = p.l4_off,
		.jh_off = p.jh_off,
		.ver_flags = p.ver_flags,
		.ip_tot_len = p.ip_tot_len,
	};
	/* jasper_parse_header checked that the Jasper header, so Ethernet and IP, are there. */
	if (data + RELAY_HDR_FIXED > data_end) {
		n.malformed++;
		goto out;
	}
	__builtin_memcpy(s.h.dmac, data, RELAY_HDR_FIXED);
	s.h.sport = p.sport;
	s.h.dport = p.dport;
	int mode = relay_csum_mode(skb, &s, table->flags);
	if (mode < 0) {
		n.clone_failed++;
		goto out;
	}
	s.csum_mode = mode;
	action = relay_fan_out(skb, &s, targets, p.flags, own_mark, &n);

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
