/* jasper_helpers.h: bounds-checked packet parsing, the duplicate ring and counters, shared inline. */
#ifndef JASPER_HELPERS_H
#define JASPER_HELPERS_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "jasper_wire.h"
#include "jasper_consts.h"

#define JASPER_KNOWN_FLAGS (JASPER_FLAG_HEDGE_COPY | JASPER_FLAG_RETRANSMIT | JASPER_FLAG_HEARTBEAT)

/* Bytes the programs must see in the linear area: Ethernet, IPv4 with options, UDP, header. */
#define JASPER_PARSE_SPAN (sizeof(struct ethhdr) + 60 + sizeof(struct udphdr) + JASPER_HEADER_LEN)

enum jasper_parse_result {
	JASPER_NOT_UDP = 0, /* not IPv4/UDP or too short to tell: not ours, pass */
	JASPER_UDP,         /* IPv4/UDP, ports known: caller decides whether the port is ours */
	JASPER_OK,          /* a valid Jasper datagram */
	JASPER_MALFORMED,   /* to our port but not a valid Jasper datagram */
};

/* Where things are in the packet and the fields the programs act on (addresses/ports raw, in
 * network byte order, as the checksum helpers want them). */
struct jasper_parsed {
	__u32 l4_off;    /* offset of the UDP header */
	__u32 jh_off;    /* offset of the Jasper header */
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u16 ip_tot_len; /* host order */
	__u16 ver_flags;  /* raw 16-bit word holding version and flags */
	__u8 flags;
	__u32 stream_id;  /* host order */
	__u32 session;    /* host order */
	__u64 seq;        /* host order */
	__u64 msg_id;     /* what tells messages apart: seq, or the send time for heartbeats */
	__u64 tag;        /* the MAC's first 8 bytes, as on the wire */
};

/* Stage 1: Ethernet, IPv4, UDP. pkt_len is the real length of the packet (skb->len at TC), which
 * can exceed data_end - data when the tail is not linear. */
static __always_inline int jasper_parse_udp(void *data, void *data_end, __u32 pkt_len,
					    struct jasper_parsed *p)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return JASPER_NOT_UDP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return JASPER_NOT_UDP;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return JASPER_NOT_UDP;
	if (ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_UDP_NUM)
		return JASPER_NOT_UDP;
	/* Non-first fragments carry no UDP header; they are not ours to judge. */
	if (bpf_ntohs(ip->frag_off) & 0x1FFF)
		return JASPER_NOT_UDP;
	__u32 l4_off = sizeof(struct ethhdr) + ((__u32)ip->ihl & 0xF) * 4;
	struct udphdr *udp = data + l4_off;
	if ((void *)(udp + 1) > data_end)
		return JASPER_NOT_UDP;
	p->l4_off = l4_off;
	p->jh_off = l4_off + sizeof(struct udphdr);
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->sport = udp->source;
	p->dport = udp->dest;
	p->ip_tot_len = bpf_ntohs(ip->tot_len);
	(void)pkt_len;
	return JASPER_UDP;
}

/* Stage 2, once the port is ours: fragments, lengths, magic, version, flags. Any failure is the
 * sender's fault and is counted as malformed. */
static __always_inline int jasper_parse_header(void *data, void *data_end, __u32 pkt_len,
					       struct jasper_parsed *p)
{
	struct iphdr *ip = data + sizeof(struct ethhdr);
	if ((void *)(ip + 1) > data_end)
		return JASPER_MALFORMED;
	/* A Jasper datagram always fits the MTU: a first fragment is never one of ours. */
	if (bpf_ntohs(ip->frag_off) & 0x2000) /* more fragments follow */
		return JASPER_MALFORMED;
	__u32 ip_hlen = p->l4_off - sizeof(struct ethhdr);
	if (p->ip_tot_len < ip_hlen + sizeof(struct udphdr) + JASPER_HEADER_LEN)
		return JASPER_MALFORMED;
	/* Truncated: the IP header promises more bytes than arrived. */
	if (sizeof(struct ethhdr) + (__u32)p->ip_tot_len > pkt_len)
		return JASPER_MALFORMED;
	struct udphdr *udp = data + (p->l4_off & 0xFF);
	if ((void *)(udp + 1) > data_end)
		return JASPER_MALFORMED;
	__u32 udp_len = bpf_ntohs(udp->len);
	if (udp_len != p->ip_tot_len - ip_hlen)
		return JASPER_MALFORMED;
	struct jasper_hdr *jh = (void *)(udp + 1);
	if ((void *)(jh + 1) > data_end)
		return JASPER_MALFORMED;
	if (jh->magic != bpf_htons(JASPER_MAGIC) || jh->version != JASPER_VERSION)
		return JASPER_MALFORMED;
	if (jh->flags & ~JASPER_KNOWN_FLAGS)
		return JASPER_MALFORMED;
	__u32 payload_len = bpf_ntohs(jh->payload_len);
	if (payload_len > JASPER_MAX_PAYLOAD ||
	    payload_len != udp_len - sizeof(struct udphdr) - JASPER_HEADER_LEN)
		return JASPER_MALFORMED;
	/* The header's own count rules; walking the message blocks is left to the receivers, so a
	 * relay's per-copy cost does not grow with the batch. */
	__u16 msg_count = bpf_ntohs(jh->msg_count);
	if ((jh->flags & JASPER_FLAG_HEARTBEAT) ? (msg_count || payload_len) : !msg_count)
		return JASPER_MALFORMED;
	p->ver_flags = *(__u16 *)((void *)jh + 2);
	p->flags = jh->flags;
	p->stream_id = bpf_ntohl(jh->stream_id);
	p->session = bpf_ntohl(jh->session);
	p->seq = bpf_be64_to_cpu(jh->seq);
	/* Heartbeats repeat the last data seq; each one is told apart by its send time, and the
	 * heartbeat bit in the key keeps them from shadowing the data message with that seq. */
	p->msg_id = (jh->flags & JASPER_FLAG_HEARTBEAT) ? bpf_be64_to_cpu(jh->send_time_ns) : p->seq;
	/* The kernel cannot check the MAC (receivers do), but it keys its dedup on it: a forged
	 * copy with a real message's (stream, session, seq) differs in the tag, so it cannot make
	 * the real copies look like duplicates; it only reaches the receiver that rejects it. */
	p->tag = *(__u64 *)jh->mac;
	return JASPER_OK;
}

static __always_inline __u64 jasper_mix64(__u64 x)
{
	/* splitmix64 finaliser: cheap, and every input bit moves every output bit. */
	x ^= x >> 30;
	x *= 0xBF58476D1CE4E5B9ULL;
	x ^= x >> 27;
	x *= 0x94D049BB133111EBULL;
	x ^= x >> 31;
	return x;
}

/* Fingerprint of one copy (stream, session, msg_id, MAC tag); never 0, since 0 marks an empty
 * slot. Hedged copies of one datagram carry the same tag (the hedge bit is outside the MAC).
 * `extra` carries the heartbeat bit, and the destination port at receivers. */
static __always_inline __u64 jasper_fingerprint(const struct jasper_parsed *p, __u64 extra)
{
	__u64 id = ((__u64)p->stream_id << 32) | p->session;
	__u64 fp = jasper_mix64(id ^ jasper_mix64(p->msg_id ^ (extra << 40)) ^ jasper_mix64(p->tag));
	return fp ? fp : 1;
}

/* Consecutive sequence numbers of one stream land in consecutive slots, as in the DedupRing. */
static __always_inline __u32 jasper_slot(const struct jasper_parsed *p, __u64 extra)
{
	__u64 id = ((__u64)p->stream_id << 32) | p->session;
	return ((__u32)jasper_mix64(id ^ (extra << 20)) + (__u32)p->msg_id) & (JASPER_RING_SLOTS - 1);
}

/* Returns 1 when this copy was already seen. The slot is claimed with compare-and-swap because
 * copies of one message arrive on several CPUs at once: exactly one of them may win. */
static __always_inline int jasper_ring_seen(void *ring, __u32 slot, __u64 fp)
{
	__u64 *cell = bpf_map_lookup_elem(ring, &slot);
	if (!cell)
		return 0;
	for (int i = 0; i < JASPER_CAS_TRIES; i++) {
		__u64 old = *(volatile __u64 *)cell;
		if (old == fp)
			return 1;
		if (__sync_val_compare_and_swap(cell, old, fp) == old)
			return 0;
	}
	/* Lost the race JASPER_CAS_TRIES times to other messages: forward rather than lose data. */
	return 0;
}

static __always_inline void jasper_count(void *stats, __u32 idx, __u64 n)
{
	/* No `if (!n) return`: a branch on the tally would make the verifier track every
	 * combination of counts as a separate state. */
	__u64 *v = bpf_map_lookup_elem(stats, &idx);
	if (v)
		*v += n; /* per-CPU slot: no other writer */
}

#endif /* JASPER_HELPERS_H */
