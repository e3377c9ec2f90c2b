// Emulated loss on one link: at TC ingress of the receiving namespace, drops IPv4 packets from one
// source address with a fixed probability. SRC_ADDR (network byte order, as a host u32) and
// DROP_THRESHOLD (drop when bpf_get_prandom_u32() < it) are set with -D at compile time, so the
// program needs no map writes from user space; per-outcome counters sit in an array map.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef SRC_ADDR
#define SRC_ADDR 0
#endif
#ifndef DROP_THRESHOLD
#define DROP_THRESHOLD 0
#endif

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2); /* 0: passed, 1: dropped */
	__type(key, __u32);
	__type(value, __u64);
} linkloss_counters SEC(".maps");

SEC("tc")
int link_loss(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__u32 key;
	__u64 *count;

	if ((void *)(ip + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->saddr != (__u32)SRC_ADDR)
		return TC_ACT_OK;
	key = bpf_get_prandom_u32() < (__u32)DROP_THRESHOLD ? 1 : 0;
	count = bpf_map_lookup_elem(&linkloss_counters, &key);
	if (count)
		__sync_fetch_and_add(count, 1);
	return key ? TC_ACT_SHOT : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
