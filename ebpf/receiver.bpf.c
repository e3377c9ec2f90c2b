/* receiver.bpf.c: receiver-host filter: drop hedged duplicates and strangers, pass the rest. */
#define JASPER_RECEIVER 1
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "jasper_wire.h"
#include "jasper_consts.h"
#include "jasper_structs.h"
#include "jasper_maps.h"
#include "jasper_helpers.h"

enum receiver_verdict { VERDICT_PASS = 0, VERDICT_DROP = 1 };

/* The filter itself, independent of the hook; one exit that records the outcome. */
static __always_inline int receiver_filter(void *data, void *data_end, __u32 pkt_len)
{
	struct jasper_parsed p = {};
	__u32 outcome = RECV_PASSED;
	int verdict = VERDICT_PASS;

	if (jasper_parse_udp(data, data_end, pkt_len, &p) != JASPER_UDP)
		goto out;
	if (!bpf_map_lookup_elem(&recv_ports, &p.dport))
		goto out;
	jasper_count(&recv_stats, RECV_IN, 1);
	verdict = VERDICT_DROP;
	if (jasper_parse_header(data, data_end, pkt_len, &p) != JASPER_OK) {
		outcome = RECV_MALFORMED;
		goto out;
	}
	struct jasper_parent_key key = {.saddr = p.saddr, .sport = p.sport};
	if (!bpf_map_lookup_elem(&recv_parents, &key)) {
		key.sport = 0;
		if (!bpf_map_lookup_elem(&recv_parents, &key)) {
			outcome = RECV_NOT_PARENT;
			goto out;
		}
	}
	/* Each endpoint (port) keeps its own copy of every message: the port is part of the key. */
	__u64 extra = ((__u64)p.dport << 1) | ((p.flags & JASPER_FLAG_HEARTBEAT) ? 1 : 0);
	if (jasper_ring_seen(&recv_ring, jasper_slot(&p, extra), jasper_fingerprint(&p, extra))) {
		outcome = RECV_DUPLICATES;
		goto out;
	}
	outcome = RECV_ACCEPTED;
	verdict = VERDICT_PASS;
out:
	jasper_count(&recv_stats, outcome, 1);
	return verdict;
}

SEC("tc")
int jasper_receiver_tc(struct __sk_buff *skb)
{
	if (skb->len >= JASPER_PARSE_SPAN)
		bpf_skb_pull_data(skb, JASPER_PARSE_SPAN);
	else
		bpf_skb_pull_data(skb, skb->len);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	/* TC_ACT_UNSPEC: let later filters on the interface (other nodes' programs) see it too. */
	return receiver_filter(data, data_end, skb->len) == VERDICT_DROP ? TC_ACT_SHOT
									 : TC_ACT_UNSPEC;
}

SEC("xdp")
int jasper_receiver_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* XDP sees the linear frame only; a frame longer than that is judged on what is there. */
	__u32 len = data_end - data;
	return receiver_filter(data, data_end, len) == VERDICT_DROP ? XDP_DROP : XDP_PASS;
}

char _license[] SEC("license") = "GPL";
