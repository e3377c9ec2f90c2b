// An emulated VM's network switch, for the faults that stop a relay: at TC ingress of the host's
// interface, drops every packet while gate[0] is non-zero (user space flips it with one map
// update, in microseconds, so a 300 µs pause stays 300 µs). Needed because a relay on the eBPF
// fast path forwards in the kernel: killing or stopping its process leaves the TC program
// attached and forwarding, while a dead or paused VM forwards nothing.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} nodegate_closed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} nodegate_dropped SEC(".maps");

SEC("tc")
int node_gate(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u64 *closed = bpf_map_lookup_elem(&nodegate_closed, &key);
	__u64 *dropped;

	if (!closed || !*closed)
		return TC_ACT_OK;
	dropped = bpf_map_lookup_elem(&nodegate_dropped, &key);
	if (dropped)
		*dropped += 1;
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
