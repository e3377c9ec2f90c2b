/* jasper_mp.h: the framing of what a receiver hands an MP (docs/mp-feed.md). */
/* GENERATED from jasper/mp_spec.py by `python -m jasper.mp_spec`; do not edit. */
#ifndef JASPER_MP_H
#define JASPER_MP_H

#include <linux/types.h>

#define JASPER_MP_MAGIC 0x4A4D
#define JASPER_MP_VERSION 1
#define JASPER_MP_FLAG_LATE 0x01
#define JASPER_MP_FLAG_GAP_BEFORE 0x02
#define JASPER_MP_FLAG_RECOVERED 0x04
#define JASPER_MP_HEADER_LEN 40
#define JASPER_MP_MAX_DELIVERY 28160

/* All multi-byte fields are in network byte order. */
struct jasper_mp_hdr {
	__u16 magic; /* 0x4A4D ('JM'); anything else is not a Jasper MP message */
	__u8 version; /* framing version, 1 */
	__u8 flags; /* bit 0 late, bit 1 gap before, bit 2 recovered; others 0 */
	__u32 stream_id; /* market-data stream */
	__u64 seq; /* sequence number of this message within (stream, session), from 1 */
	__u64 release_ns; /* receiver clock when released, ns since the Unix epoch */
	__u64 deadline_ns; /* deadline held to (ns): the root's stamp or the stream's floor */
	__u32 session; /* publisher session; sequence numbers restart in a new one */
	__u16 length; /* bytes of message that follow this header */
	__u16 reserved; /* 0 */
} __attribute__((packed));

_Static_assert(sizeof(struct jasper_mp_hdr) == 40, "jasper_mp_hdr size");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, magic) == 0, "jasper_mp_hdr.magic offset");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, version) == 2, "jasper_mp_hdr.version offset");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, flags) == 3, "jasper_mp_hdr.flags offset");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, stream_id) == 4, "jasper_mp_hdr.stream_id offset");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, seq) == 8, "jasper_mp_hdr.seq offset");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, release_ns) == 16, "jasper_mp_hdr.release_ns offset");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, deadline_ns) == 24, "jasper_mp_hdr.deadline_ns offset");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, session) == 32, "jasper_mp_hdr.session offset");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, length) == 36, "jasper_mp_hdr.length offset");
_Static_assert(__builtin_offsetof(struct jasper_mp_hdr, reserved) == 38, "jasper_mp_hdr.reserved offset");

#endif /* JASPER_MP_H */
