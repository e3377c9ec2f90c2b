/* jasper_wire.h: the Jasper data header, shared by eBPF, the native path and Python. */
/* GENERATED from jasper/wire_spec.py by `python -m jasper.wire_spec`; do not edit. */
#ifndef JASPER_WIRE_H
#define JASPER_WIRE_H

#include <linux/types.h>

#define JASPER_MAGIC 0x4A53
#define JASPER_VERSION 3
#define JASPER_FLAG_HEDGE_COPY 0x01
#define JASPER_FLAG_RETRANSMIT 0x02
#define JASPER_FLAG_HEARTBEAT 0x04
#define JASPER_FLAG_NAK 0x08
#define JASPER_HEADER_LEN 64
#define JASPER_MAX_PAYLOAD 1408
#define JASPER_BLOCK_HEADER_LEN 2
#define JASPER_MAX_MESSAGES 704
#define JASPER_MAC_LEN 16
#define JASPER_MAC_OFFSET 48
#define JASPER_KEY_LEN 32
#define JASPER_NAK_RANGE_LEN 16
#define JASPER_MAX_NAK_RANGES 32
#define JASPER_MAX_NAK_COUNT 4096

/* All multi-byte fields are in network byte order. */
struct jasper_hdr {
	__u16 magic; /* 0x4A53 ('JS'); anything else is not a Jasper datagram */
	__u8 version; /* header version, 3; other versions are rejected */
	__u8 flags; /* bit 0 hedge copy, 1 retransmit, 2 heartbeat, 3 NAK; others zero */
	__u32 stream_id; /* market-data stream */
	__u32 session; /* publisher session (epoch); a restarted publisher takes a new one */
	__u32 plan_epoch; /* tree plan the message was sent under (make-before-break) */
	__u64 seq; /* sequence number of the first message within (stream, session), from 1 */
	__u64 send_time_ns; /* root send time, ns since the Unix epoch on the root's clock */
	__u64 deadline_ns; /* release time of every message, ns since the epoch; 0 = at once */
	__u16 payload_len; /* bytes of payload that follow the header */
	__u16 msg_count; /* messages in the payload: 0 for a heartbeat, >= 1 for data */
	__u32 key_epoch; /* epoch of the stream key the MAC was made with (rotation) */
	__u8 mac[16]; /* HMAC-SHA256, first 16 bytes (docs/wire-format.md, MAC) */
} __attribute__((packed));

_Static_assert(sizeof(struct jasper_hdr) == 64, "jasper_hdr size");
_Static_assert(__builtin_offsetof(struct jasper_hdr, magic) == 0, "jasper_hdr.magic offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, version) == 2, "jasper_hdr.version offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, flags) == 3, "jasper_hdr.flags offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, stream_id) == 4, "jasper_hdr.stream_id offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, session) == 8, "jasper_hdr.session offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, plan_epoch) == 12, "jasper_hdr.plan_epoch offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, seq) == 16, "jasper_hdr.seq offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, send_time_ns) == 24, "jasper_hdr.send_time_ns offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, deadline_ns) == 32, "jasper_hdr.deadline_ns offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, payload_len) == 40, "jasper_hdr.payload_len offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, msg_count) == 42, "jasper_hdr.msg_count offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, key_epoch) == 44, "jasper_hdr.key_epoch offset");
_Static_assert(__builtin_offsetof(struct jasper_hdr, mac) == 48, "jasper_hdr.mac offset");

/* One range of a NAK's payload (flags == JASPER_FLAG_NAK). */
struct jasper_nak_range {
	__u64 first_seq; /* first missing sequence number of the range */
	__u32 count; /* missing sequence numbers from first_seq on, >= 1 */
	__u16 attempt; /* 1 for the first NAK of the range, then 2, 3, ... */
	__u16 reserved; /* 0 */
} __attribute__((packed));

_Static_assert(sizeof(struct jasper_nak_range) == 16, "jasper_nak_range size");
_Static_assert(__builtin_offsetof(struct jasper_nak_range, first_seq) == 0, "jasper_nak_range.first_seq offset");
_Static_assert(__builtin_offsetof(struct jasper_nak_range, count) == 8, "jasper_nak_range.count offset");
_Static_assert(__builtin_offsetof(struct jasper_nak_range, attempt) == 12, "jasper_nak_range.attempt offset");
_Static_assert(__builtin_offsetof(struct jasper_nak_range, reserved) == 14, "jasper_nak_range.reserved offset");

#endif /* JASPER_WIRE_H */
