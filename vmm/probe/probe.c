/*
 * probe.c - a tiny freestanding guest for testing Hull's VMM.
 *
 * It checks what a Linux kernel would be handed (the boot_params "zero page",
 * the command line, the e820 map, the virtio-mmio devices named on the
 * command line) and, when asked on the command line, drives a virtio-vsock
 * echo session and a virtio-fs FUSE_INIT round trip. Every result is one
 * "HULL-PROBE ..." line on COM1; see README.md for the protocol.
 *
 * Rules this file keeps:
 *  - general-purpose registers only (no SSE/AVX), no libc, no interrupts:
 *    every device is driven by polling, and every wait is bounded;
 *  - every value read from a device or from the VMM's boot data is range
 *    checked before it is used as an index or a length; a bad value prints
 *    a FAIL line and never touches memory out of bounds.
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int32_t i32;
typedef int64_t i64;

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* Accesses the compiler may neither drop, merge nor reorder. */
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* Everything the probe touches must lie in the identity map set up at entry. */
#define IDENTITY_MAP_END (1ULL << 32)

enum boot_mode { BOOT_LINUX = 0, BOOT_PVH = 1 };

void probe_main(u64 info, u32 mode) __attribute__((noreturn));
void halt_forever(void) __attribute__((noreturn)); /* entry.S */

/* ====================================================================== */
/* CPU helpers                                                            */
/* ====================================================================== */

static inline void outb(u16 port, u8 val)
{
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port) : "memory");
}

static inline u8 inb(u16 port)
{
	u8 val;
	__asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port) : "memory");
	return val;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" : : : "memory");
}

/*
 * Full memory barrier. A locked add is a full barrier on every x86-64 CPU and,
 * unlike mfence, does not depend on an SSE2 feature bit.
 */
static inline void mb(void)
{
	__asm__ volatile("lock addl $0, (%%rsp)" : : : "memory", "cc");
}

/* Compiler-only barrier: enough between loads on x86 (loads are not reordered). */
static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/*
 * gcc may emit calls to these for struct copies and initialisers, even when
 * freestanding. build.sh disables loop-to-libcall conversion so these loops
 * do not turn into calls to themselves.
 */
void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	if (d < s) {
		while (n--)
			*d++ = *s++;
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

/* Little-endian loads from possibly unaligned guest memory. */
static u16 ld16(const u8 *p) { return (u16)(p[0] | p[1] << 8); }
static u32 ld32(const u8 *p) { return (u32)ld16(p) | (u32)ld16(p + 2) << 16; }
static u64 ld64(const u8 *p) { return (u64)ld32(p) | (u64)ld32(p + 4) << 32; }

/* ====================================================================== */
/* Serial output (16550 COM1)                                             */
/* ====================================================================== */

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THR_EMPTY 0x20
#define SERIAL_SPIN_LIMIT 100000

static void serial_putc(char c)
{
	/* Bounded: a missing or stuck UART must not hang the probe. */
	for (u32 i = 0; i < SERIAL_SPIN_LIMIT; i++) {
		if (inb(COM1_LSR) & LSR_THR_EMPTY)
			break;
		cpu_relax();
	}
	outb(COM1, (u8)c);
}

/* Anything outside printable ASCII is shown as '?', so that a value read from
 * the VMM (the command line, a tag) always stays on its one line. */
static void put_str(const char *s)
{
	for (; *s; s++)
		serial_putc(*s >= 0x20 && *s < 0x7f ? *s : '?');
}

static void put_uint(u64 v, unsigned base)
{
	char buf[24];
	int i = 0;
	do {
		buf[i++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (i)
		serial_putc(buf[--i]);
}

/*
 * A minimal printf: %s (string, see put_str), %c, %u, %d, %x, with an 'l'
 * prefix for 64-bit values, and %%.
 */
static void put_fmt(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			serial_putc(*fmt);
			continue;
		}
		bool is_long = false;
		if (fmt[1] == 'l') {
			is_long = true;
			fmt++;
		}
		fmt++;
		switch (*fmt) {
		case 's':
			put_str(va_arg(ap, const char *));
			break;
		case 'c':
			serial_putc((char)va_arg(ap, int));
			break;
		case 'u':
			put_uint(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 10);
			break;
		case 'x':
			put_uint(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 16);
			break;
		case 'd': {
			i64 v = is_long ? va_arg(ap, i64) : va_arg(ap, i32);
			if (v < 0) {
				serial_putc('-');
				put_uint(-(u64)v, 10);
			} else {
				put_uint((u64)v, 10);
			}
			break;
		}
		case '%':
			serial_putc('%');
			break;
		case '\0':
			return;
		default:
			serial_putc('%');
			serial_putc(*fmt);
			break;
		}
	}
}

/* One protocol line: "HULL-PROBE <fmt>\n". */
__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	put_str("HULL-PROBE ");
	put_fmt(fmt, ap);
	serial_putc('\n');
	va_end(ap);
}

/* One failure line: "HULL-PROBE FAIL <fmt>\n". */
__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	put_str("HULL-PROBE FAIL ");
	put_fmt(fmt, ap);
	serial_putc('\n');
	va_end(ap);
}

/* ====================================================================== */
/* Command line                                                           */
/* ====================================================================== */

#define CMDLINE_MAX 4095
static char cmdline[CMDLINE_MAX + 1];

/* What the command line asks of the probe. */
#define MAX_MMIO_DEVICES 16

struct mmio_device {
	u64 base;
	u64 size;
	u32 irq;
};

static struct {
	struct mmio_device mmio[MAX_MMIO_DEVICES];
	u32 n_mmio;
	bool vsock;	/* probe.vsock_port=N given */
	u32 vsock_port;
	bool fs;	/* probe.fs=1 */
	bool end_halt;	/* probe.end=halt */
	bool end_triple;	/* probe.end=triple-fault */
} opts;

/* A piece of the command line: p[0..len). */
struct slice {
	const char *p;
	size_t len;
};

/* Consumes `prefix` from the front of `s` if it is there. */
static bool slice_eat(struct slice *s, const char *prefix)
{
	size_t n = 0;
	while (prefix[n]) {
		if (n >= s->len || s->p[n] != prefix[n])
			return false;
		n++;
	}
	s->p += n;
	s->len -= n;
	return true;
}

static bool slice_is(struct slice s, const char *word)
{
	return slice_eat(&s, word) && s.len == 0;
}

static int digit_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return 99;
}

/*
 * Consumes an unsigned number: hex with a "0x" prefix, else decimal. Needs
 * at least one digit; fails on overflow of 64 bits.
 */
static bool slice_number(struct slice *s, u64 *out)
{
	unsigned base = 10;
	if (s->len > 2 && s->p[0] == '0' && (s->p[1] == 'x' || s->p[1] == 'X') &&
	    digit_value(s->p[2]) < 16) {
		base = 16;
		s->p += 2;
		s->len -= 2;
	}
	u64 v = 0;
	size_t n = 0;
	while (n < s->len && digit_value(s->p[n]) < (int)base) {
		u64 d = (u64)digit_value(s->p[n]);
		if (v > (UINT64_MAX - d) / base)
			return false;
		v = v * base + d;
		n++;
	}
	if (n == 0)
		return false;
	s->p += n;
	s->len -= n;
	*out = v;
	return true;
}

/* A size as Linux's memparse reads it: a number with an optional K/M/G. */
static bool slice_size(struct slice *s, u64 *out)
{
	u64 v;
	if (!slice_number(s, &v))
		return false;
	unsigned shift = 0;
	if (s->len) {
		switch (s->p[0]) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		}
		if (shift) {
			s->p++;
			s->len--;
		}
	}
	if (v > (UINT64_MAX >> shift))
		return false;
	*out = v << shift;
	return true;
}

/*
 * virtio_mmio.device=<size>@<base>:<irq>[:<id>], as Linux reads it. The
 * window must hold the registers and config space (>= 0x200 bytes), be
 * 4-byte aligned and lie inside the identity map.
 */
static void parse_mmio_device(struct slice s)
{
	struct slice orig = s;
	u64 size, base, irq, id;
	if (!slice_size(&s, &size) || !slice_eat(&s, "@") || !slice_number(&s, &base) ||
	    !slice_eat(&s, ":") || !slice_number(&s, &irq) || irq > UINT32_MAX ||
	    (slice_eat(&s, ":") && !slice_number(&s, &id)) || s.len != 0) {
		/* orig is not NUL-terminated; print a bounded copy. */
		char tok[64];
		size_t n = MIN(orig.len, sizeof(tok) - 1);
		memcpy(tok, orig.p, n);
		tok[n] = '\0';
		fail("cmdline bad virtio_mmio.device=%s", tok);
		return;
	}
	if (size < 0x200 || base == 0 || (base & 3) || base >= IDENTITY_MAP_END ||
	    size > IDENTITY_MAP_END - base) {
		fail("cmdline virtio_mmio.device size=0x%lx base=0x%lx out of range", size, base);
		return;
	}
	if (opts.n_mmio >= MAX_MMIO_DEVICES) {
		fail("cmdline more than %u virtio_mmio devices; 0x%lx ignored",
		     (u32)MAX_MMIO_DEVICES, base);
		return;
	}
	opts.mmio[opts.n_mmio++] = (struct mmio_device){ base, size, (u32)irq };
}

/* Reads the options the probe understands; unknown words are ignored. */
static void parse_cmdline(void)
{
	const char *p = cmdline;
	for (;;) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		if (!*p)
			break;
		struct slice tok = { p, 0 };
		while (p[tok.len] && p[tok.len] != ' ' && p[tok.len] != '\t' && p[tok.len] != '\n')
			tok.len++;
		p += tok.len;

		u64 v;
		if (slice_eat(&tok, "virtio_mmio.device=")) {
			parse_mmio_device(tok);
		} else if (slice_eat(&tok, "probe.vsock_port=")) {
			if (slice_number(&tok, &v) && tok.len == 0 && v <= UINT32_MAX) {
				opts.vsock = true;
				opts.vsock_port = (u32)v;
			} else {
				fail("cmdline bad probe.vsock_port");
			}
		} else if (slice_eat(&tok, "probe.fs=")) {
			if (slice_is(tok, "1"))
				opts.fs = true;
			else if (slice_is(tok, "0"))
				opts.fs = false;
			else
				fail("cmdline bad probe.fs (want 0 or 1)");
		} else if (slice_eat(&tok, "probe.end=")) {
			if (slice_is(tok, "halt"))
				opts.end_halt = true;
			else if (slice_is(tok, "reset"))
				opts.end_halt = false;
			else if (slice_is(tok, "triple-fault"))
				opts.end_triple = true;
			else
				fail("cmdline bad probe.end (want halt, reset or triple-fault)");
		}
	}
}

/*
 * Copies the command line at guest-physical `addr` into cmdline[], reading at
 * most `limit` bytes (or CMDLINE_MAX when limit is 0) and stopping at a NUL.
 */
static void copy_cmdline(u64 addr, u32 limit)
{
	u32 max = (limit == 0 || limit > CMDLINE_MAX) ? CMDLINE_MAX : limit;
	if (addr == 0 || addr >= IDENTITY_MAP_END || max > IDENTITY_MAP_END - addr) {
		fail("cmdline at 0x%lx is outside the identity map", addr);
		return;
	}
	const char *src = (const char *)addr;
	u32 n = 0;
	while (n < max && src[n])
		n++;
	memcpy(cmdline, src, n);
	cmdline[n] = '\0';
	if (n == CMDLINE_MAX && (limit == 0 || limit > CMDLINE_MAX))
		fail("cmdline reached the probe's %u-byte limit; may be truncated",
		     (u32)CMDLINE_MAX);
}

/* ====================================================================== */
/* Boot data: Linux boot_params or PVH hvm_start_info                     */
/* ====================================================================== */

/* struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h). */
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_BOOT_FLAG 0x1fe
#define BP_HEADER 0x202
#define BP_TYPE_OF_LOADER 0x210
#define BP_CMD_LINE_PTR 0x228
#define BP_CMDLINE_SIZE 0x238
#define BP_E820_TABLE 0x2d0
#define BP_SIZE 4096
#define E820_MAX_ENTRIES 128
#define E820_ENTRY_SIZE 20

#define BOOT_FLAG_MAGIC 0xaa55
#define HDRS_MAGIC 0x53726448 /* "HdrS" */

static void read_linux_boot(u64 zero_page)
{
	if (zero_page >= IDENTITY_MAP_END - BP_SIZE) {
		fail("bootparams pointer 0x%lx is outside the identity map", zero_page);
		return;
	}
	const u8 *bp = (const u8 *)zero_page;
	u16 boot_flag = ld16(bp + BP_BOOT_FLAG);
	u32 header = ld32(bp + BP_HEADER);
	if (boot_flag != BOOT_FLAG_MAGIC || header != HDRS_MAGIC) {
		/* Not a zero page at all: nothing else in it can be trusted. */
		fail("bootparams bad magic boot_flag=0x%x header=0x%x at 0x%lx", boot_flag,
		     header, zero_page);
		return;
	}

	bool ok = true;
	u64 cmd_ptr = ld32(bp + BP_CMD_LINE_PTR) | (u64)ld32(bp + BP_EXT_CMD_LINE_PTR) << 32;
	u32 cmd_size = ld32(bp + BP_CMDLINE_SIZE);
	u8 n_e820 = bp[BP_E820_ENTRIES];
	if (cmd_ptr == 0) {
		fail("bootparams cmd_line_ptr is 0");
		ok = false;
	}
	if (n_e820 == 0 || n_e820 > E820_MAX_ENTRIES) {
		fail("bootparams e820_entries=%u (want 1..=%u)", n_e820, (u32)E820_MAX_ENTRIES);
		ok = false;
	}
	if (ok)
		say("bootparams ok loader=0x%x", bp[BP_TYPE_OF_LOADER]);

	if (cmd_ptr != 0)
		copy_cmdline(cmd_ptr, cmd_size);
	say("cmdline %s", cmdline);

	if (n_e820 <= E820_MAX_ENTRIES) {
		for (u32 i = 0; i < n_e820; i++) {
			const u8 *e = bp + BP_E820_TABLE + i * E820_ENTRY_SIZE;
			say("e820 0x%lx 0x%lx %u", ld64(e), ld64(e + 8), ld32(e + 16));
		}
	}
}

/* struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h). */
#define HVM_START_MAGIC 0x336ec578
#define HVM_VERSION 0x04
#define HVM_CMDLINE_PADDR 0x18
#define HVM_MEMMAP_PADDR 0x28
#define HVM_MEMMAP_ENTRIES 0x30
#define HVM_INFO_SIZE 0x38
#define HVM_MEMMAP_ENTRY_SIZE 24

static void read_pvh_boot(u64 info)
{
	say("bootparams skipped (pvh)");
	if (info == 0 || info >= IDENTITY_MAP_END - HVM_INFO_SIZE) {
		fail("pvh start_info pointer 0x%lx is outside the identity map", info);
		return;
	}
	const u8 *si = (const u8 *)info;
	if (ld32(si) != HVM_START_MAGIC) {
		fail("pvh start_info bad magic 0x%x", ld32(si));
		return;
	}
	u64 cmd_ptr = ld64(si + HVM_CMDLINE_PADDR);
	if (cmd_ptr != 0)
		copy_cmdline(cmd_ptr, 0);
	say("cmdline %s", cmdline);

	/* The memory map exists from start_info version 1 on. */
	u32 version = ld32(si + HVM_VERSION);
	u64 map = ld64(si + HVM_MEMMAP_PADDR);
	u32 n = ld32(si + HVM_MEMMAP_ENTRIES);
	if (version < 1 || map == 0)
		return;
	if (n > E820_MAX_ENTRIES || map >= IDENTITY_MAP_END ||
	    (u64)n * HVM_MEMMAP_ENTRY_SIZE > IDENTITY_MAP_END - map) {
		fail("pvh memmap of %u entries at 0x%lx out of range", n, map);
		return;
	}
	for (u32 i = 0; i < n; i++) {
		const u8 *e = (const u8 *)map + i * HVM_MEMMAP_ENTRY_SIZE;
		say("e820 0x%lx 0x%lx %u", ld64(e), ld64(e + 8), ld32(e + 16));
	}
}

/* ====================================================================== */
/* virtio-mmio transport (version 2) and split virtqueues                 */
/* ====================================================================== */

#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */

#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_FAILED 128

#define VIRTIO_F_VERSION_1_HI (1u << 0) /* feature bit 32, in the high word */

#define VIRTIO_ID_VSOCK 19
#define VIRTIO_ID_FS 26

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

/* Bounds on device waits, in polling iterations. */
#define DEVICE_RESET_SPIN_LIMIT (1u << 20)
#define CONFIG_GENERATION_TRIES 64

static u32 mmio_read32(u64 base, u32 off)
{
	return *(volatile u32 *)(base + off);
}

static u8 mmio_read8(u64 base, u32 off)
{
	return *(volatile u8 *)(base + off);
}

static void mmio_write32(u64 base, u32 off, u32 val)
{
	*(volatile u32 *)(base + off) = val;
}

/* The largest queue the probe uses; the negotiated size may be smaller. */
#define QSZ 16

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vring_avail {
	u16 flags;
	u16 idx;
	u16 ring[QSZ];
	u16 used_event;
};

struct vring_used_elem {
	u32 id;
	u32 len;
};

struct vring_used {
	u16 flags;
	u16 idx;
	struct vring_used_elem ring[QSZ];
	u16 avail_event;
};

/* One split virtqueue's memory, in one page: descriptors (16-byte aligned),
 * then the available ring (2-byte), then the used ring (4-byte). */
struct vring {
	struct vring_desc desc[QSZ];
	struct vring_avail avail;
	struct vring_used used __attribute__((aligned(4)));
} __attribute__((aligned(4096)));

_Static_assert(sizeof(struct vring_desc) == 16, "virtq_desc layout");
_Static_assert(sizeof(struct vring) == 4096, "a vring fits one page");

/* The driver's view of one virtqueue. */
struct virtq {
	u64 base;		/* the device's MMIO window (for QueueNotify) */
	struct vring *ring;
	u16 index;		/* queue number on the device */
	u16 num;		/* negotiated size: a power of two, <= QSZ */
	u16 next_avail;		/* our copy of avail.idx */
	u16 last_used;		/* used entries consumed so far */
	bool in_flight[QSZ];	/* chain heads the device owns */
};

struct virtio_dev {
	u64 base;
	u32 id;
	const char *name;	/* for messages: "vsock", "fs" */
};

/* Acknowledges whatever interrupts the device raised; we poll instead. */
static void virtio_ack_irq(const struct virtio_dev *d)
{
	u32 isr = mmio_read32(d->base, VIRTIO_MMIO_INTERRUPT_STATUS);
	if (isr)
		mmio_write32(d->base, VIRTIO_MMIO_INTERRUPT_ACK, isr);
}

static void virtio_set_failed(const struct virtio_dev *d)
{
	u32 status = mmio_read32(d->base, VIRTIO_MMIO_STATUS);
	mmio_write32(d->base, VIRTIO_MMIO_STATUS, status | VIRTIO_STATUS_FAILED);
}

/*
 * Reset, ACKNOWLEDGE, DRIVER, feature negotiation (VIRTIO_F_VERSION_1 and
 * nothing else) and FEATURES_OK. The caller then sets up queues.
 */
static bool virtio_begin(const struct virtio_dev *d)
{
	mmio_write32(d->base, VIRTIO_MMIO_STATUS, 0);
	u32 spins = 0;
	while (mmio_read32(d->base, VIRTIO_MMIO_STATUS) != 0) {
		if (++spins >= DEVICE_RESET_SPIN_LIMIT) {
			fail("%s reset did not complete", d->name);
			return false;
		}
		cpu_relax();
	}
	mmio_write32(d->base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	mmio_write32(d->base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);

	mmio_write32(d->base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	u32 features_lo = mmio_read32(d->base, VIRTIO_MMIO_DEVICE_FEATURES);
	mmio_write32(d->base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	u32 features_hi = mmio_read32(d->base, VIRTIO_MMIO_DEVICE_FEATURES);
	if (!(features_hi & VIRTIO_F_VERSION_1_HI)) {
		fail("%s does not offer VIRTIO_F_VERSION_1 (features hi=0x%x lo=0x%x)", d->name,
		     features_hi, features_lo);
		virtio_set_failed(d);
		return false;
	}
	mmio_write32(d->base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	mmio_write32(d->base, VIRTIO_MMIO_DRIVER_FEATURES, 0);
	mmio_write32(d->base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	mmio_write32(d->base, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_F_VERSION_1_HI);

	mmio_write32(d->base, VIRTIO_MMIO_STATUS,
		     VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
	u32 status = mmio_read32(d->base, VIRTIO_MMIO_STATUS);
	if (!(status & VIRTIO_STATUS_FEATURES_OK)) {
		fail("%s rejected features (status 0x%x)", d->name, status);
		virtio_set_failed(d);
		return false;
	}
	return true;
}

static void virtio_driver_ok(const struct virtio_dev *d)
{
	mmio_write32(d->base, VIRTIO_MMIO_STATUS,
		     VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
			     VIRTIO_STATUS_DRIVER_OK);
}

/* Sets up queue `index` on `ring` with the largest power-of-two size <= QSZ
 * that the device allows. */
static bool virtq_setup(const struct virtio_dev *d, struct virtq *q, u16 index,
			struct vring *ring)
{
	mmio_write32(d->base, VIRTIO_MMIO_QUEUE_SEL, index);
	if (mmio_read32(d->base, VIRTIO_MMIO_QUEUE_READY) != 0) {
		fail("%s queue %u is already ready after reset", d->name, index);
		return false;
	}
	u32 max = mmio_read32(d->base, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0) {
		fail("%s queue %u not available (QueueNumMax 0)", d->name, index);
		return false;
	}
	u16 num = QSZ;
	while (num > max)
		num >>= 1;

	*q = (struct virtq){ .base = d->base, .ring = ring, .index = index, .num = num };
	memset(ring, 0, sizeof(*ring));

	u64 desc = (u64)(uintptr_t)&ring->desc;
	u64 avail = (u64)(uintptr_t)&ring->avail;
	u64 used = (u64)(uintptr_t)&ring->used;
	mmio_write32(d->base, VIRTIO_MMIO_QUEUE_NUM, num);
	mmio_write32(d->base, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
	mmio_write32(d->base, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
	mmio_write32(d->base, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)avail);
	mmio_write32(d->base, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)(avail >> 32));
	mmio_write32(d->base, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)used);
	mmio_write32(d->base, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)(used >> 32));
	mmio_write32(d->base, VIRTIO_MMIO_QUEUE_READY, 1);
	if (mmio_read32(d->base, VIRTIO_MMIO_QUEUE_READY) != 1) {
		fail("%s queue %u did not become ready", d->name, index);
		return false;
	}
	return true;
}

/* Sets descriptor `i` of `q` (i < q->num). */
static void virtq_set_desc(struct virtq *q, u16 i, const void *buf, u32 len, u16 flags, u16 next)
{
	q->ring->desc[i] = (struct vring_desc){
		.addr = (u64)(uintptr_t)buf, .len = len, .flags = flags, .next = next
	};
}

/* Hands the chain starting at descriptor `head` to the device and notifies it. */
static void virtq_push(struct virtq *q, u16 head)
{
	q->in_flight[head] = true;
	q->ring->avail.ring[q->next_avail % q->num] = head;
	mb(); /* descriptors and ring slot before the index */
	q->next_avail++;
	WRITE_ONCE(q->ring->avail.idx, q->next_avail);
	mb(); /* index before the notification */
	mmio_write32(q->base, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

/*
 * Takes one entry off the used ring. Returns 1 with *id (a head we handed
 * out, so < num) and *len set, 0 if the ring is empty, or -1 (after a FAIL
 * line) if the device put something impossible there.
 */
static int virtq_pop(struct virtq *q, const char *what, u16 *id, u32 *len)
{
	u16 used_idx = READ_ONCE(q->ring->used.idx);
	if (used_idx == q->last_used)
		return 0;
	if ((u16)(used_idx - q->last_used) > q->num) {
		fail("%s used.idx %u ran %u entries ahead of %u (queue size %u)", what, used_idx,
		     (u16)(used_idx - q->last_used), q->last_used, q->num);
		return -1;
	}
	barrier(); /* the entry after the index (x86 keeps loads in order) */
	struct vring_used_elem *e = &q->ring->used.ring[q->last_used % q->num];
	u32 elem_id = READ_ONCE(e->id);
	u32 elem_len = READ_ONCE(e->len);
	q->last_used++;
	if (elem_id >= q->num || !q->in_flight[elem_id]) {
		fail("%s used id %u is not a buffer in flight (queue size %u)", what, elem_id,
		     q->num);
		return -1;
	}
	q->in_flight[elem_id] = false;
	*id = (u16)elem_id;
	*len = elem_len;
	return 1;
}

/* Config space reads are bracketed by ConfigGeneration reads and retried
 * until it is unchanged, as the spec asks. */
static u32 virtio_config_generation(const struct virtio_dev *d)
{
	return mmio_read32(d->base, VIRTIO_MMIO_CONFIG_GENERATION);
}

/* ====================================================================== */
/* virtio-fs: FUSE_INIT                                                   */
/* ====================================================================== */

#define FS_CONFIG_TAG 0x00 /* u8 tag[36] */
#define FS_TAG_LEN 36
#define FS_CONFIG_NUM_REQUEST_QUEUES 0x24 /* u32 */
#define FS_HIPRIO_QUEUE 0
#define FS_REQUEST_QUEUE 1
#define FS_SPIN_LIMIT (1u << 28)

#define FUSE_INIT 26
#define FUSE_KERNEL_VERSION 7
#define FUSE_KERNEL_MINOR_VERSION 31

struct fuse_in_header {
	u32 len;
	u32 opcode;
	u64 unique;
	u64 nodeid;
	u32 uid;
	u32 gid;
	u32 pid;
	u16 total_extlen;
	u16 padding;
};

struct fuse_init_in {
	u32 major;
	u32 minor;
	u32 max_readahead;
	u32 flags;
	u32 flags2;
	u32 unused[11];
};

struct fuse_out_header {
	u32 len;
	i32 error;
	u64 unique;
};

struct fuse_init_out {
	u32 major;
	u32 minor;
	u8 rest[56]; /* max_readahead, flags, ...: not looked at */
};

static struct {
	struct fuse_in_header hdr;
	struct fuse_init_in init;
} fuse_init_req;

static struct {
	struct fuse_out_header hdr;
	struct fuse_init_out init;
} fuse_init_rsp;

_Static_assert(sizeof(fuse_init_req) == 104, "fuse_in_header + fuse_init_in");
_Static_assert(sizeof(fuse_init_rsp) == 80, "fuse_out_header + fuse_init_out");

static struct vring fs_rings[2];

static void run_fs(const struct virtio_dev *d)
{
	struct virtq hiprio, req;
	if (!virtio_begin(d))
		return;
	if (!virtq_setup(d, &hiprio, FS_HIPRIO_QUEUE, &fs_rings[0]) ||
	    !virtq_setup(d, &req, FS_REQUEST_QUEUE, &fs_rings[1])) {
		virtio_set_failed(d);
		return;
	}
	if (req.num < 2) {
		fail("fs request queue size %u cannot hold a 2-descriptor request", req.num);
		virtio_set_failed(d);
		return;
	}

	char tag[FS_TAG_LEN + 1];
	u32 n_queues, gen;
	u32 tries = 0;
	do {
		if (++tries > CONFIG_GENERATION_TRIES) {
			fail("fs config generation never settled");
			virtio_set_failed(d);
			return;
		}
		gen = virtio_config_generation(d);
		for (u32 i = 0; i < FS_TAG_LEN; i++)
			tag[i] = (char)mmio_read8(d->base, VIRTIO_MMIO_CONFIG + FS_CONFIG_TAG + i);
		n_queues = mmio_read32(d->base, VIRTIO_MMIO_CONFIG + FS_CONFIG_NUM_REQUEST_QUEUES);
	} while (virtio_config_generation(d) != gen);
	tag[FS_TAG_LEN] = '\0'; /* a 36-byte tag has no NUL of its own */
	say("fs tag=%s queues=%u", tag, n_queues);
	if (tag[0] == '\0')
		fail("fs tag is empty");
	if (n_queues == 0)
		fail("fs num_request_queues is 0");

	virtio_driver_ok(d);

	fuse_init_req.hdr = (struct fuse_in_header){
		.len = sizeof(fuse_init_req), .opcode = FUSE_INIT, .unique = 1,
	};
	fuse_init_req.init = (struct fuse_init_in){
		.major = FUSE_KERNEL_VERSION, .minor = FUSE_KERNEL_MINOR_VERSION,
	};
	memset(&fuse_init_rsp, 0, sizeof(fuse_init_rsp));
	virtq_set_desc(&req, 0, &fuse_init_req, sizeof(fuse_init_req), VRING_DESC_F_NEXT, 1);
	virtq_set_desc(&req, 1, &fuse_init_rsp, sizeof(fuse_init_rsp), VRING_DESC_F_WRITE, 0);
	virtq_push(&req, 0);

	u16 id;
	u32 len;
	int r;
	u32 spins = 0;
	while ((r = virtq_pop(&req, "fs", &id, &len)) == 0) {
		if (++spins >= FS_SPIN_LIMIT) {
			fail("fuse init: no reply after %u polls", spins);
			return;
		}
		cpu_relax();
	}
	virtio_ack_irq(d);
	if (r < 0)
		return;
	barrier(); /* read the reply only after seeing it used */
	if (len > sizeof(fuse_init_rsp)) {
		fail("fuse init used len %u exceeds the %u-byte reply buffer", len,
		     (u32)sizeof(fuse_init_rsp));
		return;
	}
	if (len < sizeof(struct fuse_out_header)) {
		fail("fuse init used len %u is shorter than fuse_out_header", len);
		return;
	}
	const struct fuse_out_header *h = &fuse_init_rsp.hdr;
	say("fuse init error=%d major=%u minor=%u len=%u", h->error, fuse_init_rsp.init.major,
	    fuse_init_rsp.init.minor, len);
	if (h->unique != 1)
		fail("fuse init reply unique=%lu, want 1", h->unique);
	if (h->len != len)
		fail("fuse init reply header len=%u but used len=%u", h->len, len);
}

/* ====================================================================== */
/* virtio-vsock: an echo session                                          */
/* ====================================================================== */

#define VSOCK_RX_QUEUE 0
#define VSOCK_TX_QUEUE 1
#define VSOCK_EVENT_QUEUE 2
#define VSOCK_CONFIG_GUEST_CID 0x00 /* u64 */

#define VSOCK_HOST_CID 2
#define VSOCK_LOCAL_PORT 1024
#define VSOCK_BUF_ALLOC 65536u		/* our receive window */
#define VSOCK_PAYLOAD_MAX 4096u		/* per packet, both directions */
#define VSOCK_HDR_LEN 44u
#define VSOCK_RX_BUF_LEN (VSOCK_HDR_LEN + VSOCK_PAYLOAD_MAX)
#define VSOCK_TX_SLOTS (QSZ / 2)	/* each packet: header + payload descriptors */
#define VSOCK_CTRL_MAX 16
/* Idle polls before giving up; an echo session may legitimately sit quiet. */
#define VSOCK_SPIN_LIMIT (1ull << 32)

#define VSOCK_TYPE_STREAM 1
enum vsock_op {
	VSOCK_OP_REQUEST = 1,
	VSOCK_OP_RESPONSE = 2,
	VSOCK_OP_RST = 3,
	VSOCK_OP_SHUTDOWN = 4,
	VSOCK_OP_RW = 5,
	VSOCK_OP_CREDIT_UPDATE = 6,
	VSOCK_OP_CREDIT_REQUEST = 7,
};
#define VSOCK_SHUTDOWN_RCV 1 /* the sender will receive no more */
#define VSOCK_EVENT_TRANSPORT_RESET 0

struct vsock_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct vsock_hdr) == VSOCK_HDR_LEN, "virtio_vsock_hdr layout");

/* Device buffers. rx: one descriptor each (header then payload); tx: slot s
 * uses descriptors 2s (header) and 2s+1 (payload); event: 4-byte events. */
static u8 vsock_rx_bufs[QSZ][VSOCK_RX_BUF_LEN] __attribute__((aligned(64)));
static struct vsock_hdr vsock_tx_hdrs[VSOCK_TX_SLOTS];
static u8 vsock_tx_data[VSOCK_TX_SLOTS][VSOCK_PAYLOAD_MAX];
static u32 vsock_events[QSZ];
static struct vring vsock_rings[3];

/* Received bytes not yet echoed: a ring buffer as large as our window, so a
 * host that honours our credit can never overflow it. */
static u8 vsock_pending[VSOCK_BUF_ALLOC];

/* A header-only packet waiting for a free tx slot. */
struct vsock_ctrl {
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u16 op;
	bool ours;	/* on our connection: carries our credit */
};

enum vsock_state { VS_CONNECTING, VS_CONNECTED, VS_CLOSING, VS_CLOSED };

struct vsock {
	struct virtq rx, tx, ev;
	u64 guest_cid;
	u32 peer_port;
	enum vsock_state state;
	bool clean_close;	/* host ended the session: print the echo total */
	bool draining;		/* host shut down its sending side: echo what is left */

	/* Credit (virtio spec 5.10.6.3); counters wrap at 2^32 by design. */
	u32 peer_buf_alloc;	/* the host's window, as last advertised */
	u32 peer_fwd_cnt;	/* bytes the host has consumed, as last advertised */
	u32 tx_cnt;		/* payload bytes we have sent */
	u32 fwd_cnt;		/* payload bytes we have consumed (echoed) */
	u32 fwd_cnt_announced;	/* our fwd_cnt in our last CREDIT_UPDATE */
	bool credit_requested;
	bool credit_update_queued;

	u32 pend_start, pend_len;	/* within vsock_pending */
	u64 echoed;

	struct vsock_ctrl ctrl[VSOCK_CTRL_MAX];
	u32 ctrl_head, ctrl_len;
};

static void vsock_queue_ctrl(struct vsock *v, u64 dst_cid, u32 src_port, u32 dst_port, u16 op,
			     bool ours)
{
	if (v->ctrl_len == VSOCK_CTRL_MAX) {
		fail("vsock control queue full; op %u to port %u dropped", op, dst_port);
		return;
	}
	v->ctrl[(v->ctrl_head + v->ctrl_len) % VSOCK_CTRL_MAX] =
		(struct vsock_ctrl){ dst_cid, src_port, dst_port, op, ours };
	v->ctrl_len++;
}

/* A control packet on our own connection. */
static void vsock_queue_own(struct vsock *v, u16 op)
{
	vsock_queue_ctrl(v, VSOCK_HOST_CID, VSOCK_LOCAL_PORT, v->peer_port, op, true);
}

/* At most one CREDIT_UPDATE waits in the control queue at a time. */
static void vsock_queue_credit_update(struct vsock *v)
{
	if (!v->credit_update_queued) {
		vsock_queue_own(v, VSOCK_OP_CREDIT_UPDATE);
		v->credit_update_queued = true;
	}
}

/* What the host can still take from us. */
static u32 vsock_peer_credit(const struct vsock *v)
{
	u32 in_flight = v->tx_cnt - v->peer_fwd_cnt;
	return in_flight >= v->peer_buf_alloc ? 0 : v->peer_buf_alloc - in_flight;
}

static int vsock_free_tx_slot(const struct vsock *v)
{
	for (u16 s = 0; s < v->tx.num / 2; s++)
		if (!v->tx.in_flight[2 * s])
			return s;
	return -1;
}

/* Sends one packet from tx slot `slot`; its payload must already be in
 * vsock_tx_data[slot]. */
static void vsock_send(struct vsock *v, int slot, u64 dst_cid, u32 src_port, u32 dst_port,
		       u16 op, u32 len, bool ours)
{
	struct vsock_hdr *h = &vsock_tx_hdrs[slot];
	*h = (struct vsock_hdr){
		.src_cid = v->guest_cid, .dst_cid = dst_cid,
		.src_port = src_port, .dst_port = dst_port,
		.len = len, .type = VSOCK_TYPE_STREAM, .op = op,
	};
	if (ours) {
		h->buf_alloc = VSOCK_BUF_ALLOC;
		h->fwd_cnt = v->fwd_cnt;
		if (op == VSOCK_OP_CREDIT_UPDATE)
			v->fwd_cnt_announced = v->fwd_cnt;
	}
	u16 head = (u16)(2 * slot);
	if (len) {
		virtq_set_desc(&v->tx, head, h, VSOCK_HDR_LEN, VRING_DESC_F_NEXT, head + 1);
		virtq_set_desc(&v->tx, head + 1, vsock_tx_data[slot], len, 0, 0);
	} else {
		virtq_set_desc(&v->tx, head, h, VSOCK_HDR_LEN, 0, 0);
	}
	virtq_push(&v->tx, head);
}

/* Fills free tx slots: control packets first, then echo data within the
 * host's credit. Returns whether anything was sent. */
static bool vsock_pump(struct vsock *v)
{
	bool sent = false;

	if (v->state == VS_CONNECTED) {
		u32 credit = vsock_peer_credit(v);
		if (credit > 0) {
			v->credit_requested = false;
		} else if (v->pend_len > 0 && !v->credit_requested) {
			vsock_queue_own(v, VSOCK_OP_CREDIT_REQUEST);
			v->credit_requested = true;
		}
		/*
		 * Every packet we send carries fwd_cnt, but some hosts only resume
		 * sending on an explicit CREDIT_UPDATE, so send one whenever our
		 * window has reopened by more than half since the last one.
		 */
		if ((u32)(v->fwd_cnt - v->fwd_cnt_announced) > VSOCK_BUF_ALLOC / 2)
			vsock_queue_credit_update(v);
	}

	int slot;
	while ((slot = vsock_free_tx_slot(v)) >= 0) {
		if (v->ctrl_len > 0) {
			struct vsock_ctrl c = v->ctrl[v->ctrl_head];
			v->ctrl_head = (v->ctrl_head + 1) % VSOCK_CTRL_MAX;
			v->ctrl_len--;
			if (c.op == VSOCK_OP_CREDIT_UPDATE && c.ours)
				v->credit_update_queued = false;
			vsock_send(v, slot, c.dst_cid, c.src_port, c.dst_port, c.op, 0, c.ours);
			sent = true;
			continue;
		}
		if (v->state != VS_CONNECTED || v->pend_len == 0)
			break;
		u32 n = vsock_peer_credit(v);
		if (n == 0)
			break;
		n = MIN(n, v->pend_len);
		n = MIN(n, VSOCK_PAYLOAD_MAX);
		n = MIN(n, VSOCK_BUF_ALLOC - v->pend_start); /* contiguous part of the ring */
		memcpy(vsock_tx_data[slot], vsock_pending + v->pend_start, n);
		v->pend_start = (v->pend_start + n) % VSOCK_BUF_ALLOC;
		v->pend_len -= n;
		v->fwd_cnt += n;
		v->tx_cnt += n;
		v->echoed += n;
		vsock_send(v, slot, VSOCK_HOST_CID, VSOCK_LOCAL_PORT, v->peer_port, VSOCK_OP_RW, n,
			   true);
		sent = true;
	}

	if (v->state == VS_CONNECTED && v->draining && v->pend_len == 0) {
		vsock_queue_own(v, VSOCK_OP_RST);
		v->clean_close = true;
		v->state = VS_CLOSING;
	}
	return sent;
}

/* Ends the connection after an error: tell the host if the device still works. */
static void vsock_abort(struct vsock *v, bool device_ok)
{
	if (device_ok && (v->state == VS_CONNECTING || v->state == VS_CONNECTED)) {
		vsock_queue_own(v, VSOCK_OP_RST);
		v->state = VS_CLOSING;
	} else {
		v->state = VS_CLOSED;
	}
}

/* Appends received stream bytes to the pending ring. */
static bool vsock_take_payload(struct vsock *v, const u8 *data, u32 len)
{
	if (len > VSOCK_BUF_ALLOC - v->pend_len) {
		fail("vsock host sent %u bytes with only %u of our credit left", len,
		     VSOCK_BUF_ALLOC - v->pend_len);
		return false;
	}
	u32 at = (v->pend_start + v->pend_len) % VSOCK_BUF_ALLOC;
	u32 first = MIN(len, VSOCK_BUF_ALLOC - at);
	memcpy(vsock_pending + at, data, first);
	memcpy(vsock_pending, data + first, len - first);
	v->pend_len += len;
	return true;
}

/* Handles one received packet (buf holds used_len valid bytes, used_len is
 * already known to be within [VSOCK_HDR_LEN, VSOCK_RX_BUF_LEN]). */
static void vsock_handle_packet(struct vsock *v, const u8 *buf, u32 used_len)
{
	struct vsock_hdr h;
	memcpy(&h, buf, sizeof(h));
	if (h.len > used_len - VSOCK_HDR_LEN) {
		fail("vsock rx packet len %u exceeds the %u bytes used after its header", h.len,
		     used_len - VSOCK_HDR_LEN);
		vsock_abort(v, true);
		return;
	}

	bool ours = h.type == VSOCK_TYPE_STREAM && h.src_cid == VSOCK_HOST_CID &&
		    h.dst_cid == v->guest_cid && h.src_port == v->peer_port &&
		    h.dst_port == VSOCK_LOCAL_PORT;
	if (!ours || v->state == VS_CLOSING || v->state == VS_CLOSED) {
		/* Someone else's (or a closed) connection: refuse new ones, ignore the rest. */
		if (h.op == VSOCK_OP_REQUEST)
			vsock_queue_ctrl(v, h.src_cid, h.dst_port, h.src_port, VSOCK_OP_RST, false);
		return;
	}

	/* Every packet carries the host's current credit. */
	v->peer_buf_alloc = h.buf_alloc;
	v->peer_fwd_cnt = h.fwd_cnt;

	if (v->state == VS_CONNECTING) {
		if (h.op == VSOCK_OP_RESPONSE) {
			v->state = VS_CONNECTED;
			say("vsock connected cid=%lu port=%u", v->guest_cid, v->peer_port);
		} else if (h.op == VSOCK_OP_RST) {
			fail("vsock connection to host port %u refused (RST)", v->peer_port);
			v->state = VS_CLOSED;
		}
		return;
	}

	/* VS_CONNECTED */
	switch (h.op) {
	case VSOCK_OP_RW:
		if (!vsock_take_payload(v, buf + VSOCK_HDR_LEN, h.len))
			vsock_abort(v, true);
		break;
	case VSOCK_OP_CREDIT_REQUEST:
		vsock_queue_credit_update(v);
		break;
	case VSOCK_OP_CREDIT_UPDATE:
		break; /* the credit fields are all it carries */
	case VSOCK_OP_SHUTDOWN:
		/* Echo what is still pending if the host can receive it; then RST. */
		v->draining = true;
		if (h.flags & VSOCK_SHUTDOWN_RCV)
			v->pend_len = 0;
		break;
	case VSOCK_OP_RST:
		/* The host is gone; an RST is never answered with an RST. */
		v->clean_close = true;
		v->state = VS_CLOSED;
		break;
	case VSOCK_OP_REQUEST:
		fail("vsock unexpected REQUEST on the open connection");
		vsock_abort(v, true);
		break;
	default:
		break; /* RESPONSE again, or an unknown op: ignore */
	}
}

/* Drains the rx used ring; returns 1 if anything arrived, 0 if not, -1 on a
 * device error. Every buffer goes straight back to the device. */
static int vsock_service_rx(struct vsock *v)
{
	int got = 0;
	u16 id;
	u32 len;
	int r;
	while ((r = virtq_pop(&v->rx, "vsock rx", &id, &len)) > 0) {
		got = 1;
		barrier();
		if (len < VSOCK_HDR_LEN || len > VSOCK_RX_BUF_LEN) {
			fail("vsock rx used len %u out of range [%u, %u]", len, VSOCK_HDR_LEN,
			     VSOCK_RX_BUF_LEN);
			return -1;
		}
		vsock_handle_packet(v, vsock_rx_bufs[id], len);
		virtq_push(&v->rx, id);
	}
	return r < 0 ? -1 : got;
}

static int vsock_service_tx(struct vsock *v)
{
	int got = 0;
	u16 id;
	u32 len;
	int r;
	/* virtq_pop only returns heads we pushed; tx used lengths carry nothing. */
	while ((r = virtq_pop(&v->tx, "vsock tx", &id, &len)) > 0)
		got = 1;
	return r < 0 ? -1 : got;
}

static int vsock_service_events(struct vsock *v)
{
	int got = 0;
	u16 id;
	u32 len;
	int r;
	while ((r = virtq_pop(&v->ev, "vsock event", &id, &len)) > 0) {
		got = 1;
		barrier();
		if (len != sizeof(vsock_events[0])) {
			fail("vsock event used len %u, want %u", len, (u32)sizeof(vsock_events[0]));
			return -1;
		}
		u32 event = vsock_events[id];
		virtq_push(&v->ev, id);
		if (event == VSOCK_EVENT_TRANSPORT_RESET) {
			fail("vsock transport reset event");
			v->state = VS_CLOSED;
		} else {
			fail("vsock unknown event %u", event);
		}
	}
	return r < 0 ? -1 : got;
}

static struct vsock vsock;

static void run_vsock(const struct virtio_dev *d, u32 port)
{
	struct vsock *v = &vsock;
	*v = (struct vsock){ .peer_port = port, .state = VS_CONNECTING };

	if (!virtio_begin(d))
		return;
	if (!virtq_setup(d, &v->rx, VSOCK_RX_QUEUE, &vsock_rings[0]) ||
	    !virtq_setup(d, &v->tx, VSOCK_TX_QUEUE, &vsock_rings[1]) ||
	    !virtq_setup(d, &v->ev, VSOCK_EVENT_QUEUE, &vsock_rings[2])) {
		virtio_set_failed(d);
		return;
	}
	if (v->tx.num < 2) {
		fail("vsock tx queue size %u is too small", v->tx.num);
		virtio_set_failed(d);
		return;
	}

	u32 gen, lo, hi, tries = 0;
	do {
		if (++tries > CONFIG_GENERATION_TRIES) {
			fail("vsock config generation never settled");
			virtio_set_failed(d);
			return;
		}
		gen = virtio_config_generation(d);
		lo = mmio_read32(d->base, VIRTIO_MMIO_CONFIG + VSOCK_CONFIG_GUEST_CID);
		hi = mmio_read32(d->base, VIRTIO_MMIO_CONFIG + VSOCK_CONFIG_GUEST_CID + 4);
	} while (virtio_config_generation(d) != gen);
	v->guest_cid = (u64)hi << 32 | lo;
	if (v->guest_cid < 3 || v->guest_cid >= UINT32_MAX) {
		fail("vsock guest_cid %lu is reserved or out of range", v->guest_cid);
		virtio_set_failed(d);
		return;
	}

	virtio_driver_ok(d);
	for (u16 i = 0; i < v->rx.num; i++) {
		virtq_set_desc(&v->rx, i, vsock_rx_bufs[i], VSOCK_RX_BUF_LEN, VRING_DESC_F_WRITE, 0);
		virtq_push(&v->rx, i);
	}
	for (u16 i = 0; i < v->ev.num; i++) {
		virtq_set_desc(&v->ev, i, &vsock_events[i], sizeof(vsock_events[i]),
			       VRING_DESC_F_WRITE, 0);
		virtq_push(&v->ev, i);
	}

	vsock_queue_own(v, VSOCK_OP_REQUEST);
	u64 idle = 0;
	while (v->state != VS_CLOSED) {
		int rx = vsock_service_rx(v);
		int tx = vsock_service_tx(v);
		int ev = vsock_service_events(v);
		if (rx < 0 || tx < 0 || ev < 0) {
			vsock_abort(v, false); /* the rings cannot be trusted any more */
			break;
		}
		bool sent = vsock_pump(v);
		if (v->state == VS_CLOSING && v->ctrl_len == 0 && vsock_free_tx_slot(v) >= 0) {
			/* Closing ends once the final packets have been consumed. */
			bool tx_idle = true;
			for (u16 i = 0; i < v->tx.num; i++)
				tx_idle = tx_idle && !v->tx.in_flight[i];
			if (tx_idle)
				v->state = VS_CLOSED;
		}
		if (rx || tx || ev || sent) {
			idle = 0;
			virtio_ack_irq(d);
		} else if (++idle >= VSOCK_SPIN_LIMIT) {
			fail("vsock session idle for %lu polls (state %u); giving up", idle,
			     (u32)v->state);
			v->state = VS_CLOSED;
		} else {
			cpu_relax();
		}
	}
	if (v->clean_close)
		say("vsock echoed %lu", v->echoed);
}

/* ====================================================================== */
/* Main                                                                   */
/* ====================================================================== */

/* Reads each virtio-mmio window from the command line, prints what is
 * there, and remembers the first vsock and virtio-fs device. */
static void discover_virtio(struct virtio_dev *vsock_dev, struct virtio_dev *fs_dev)
{
	for (u32 i = 0; i < opts.n_mmio; i++) {
		u64 base = opts.mmio[i].base;
		u32 magic = mmio_read32(base, VIRTIO_MMIO_MAGIC_VALUE);
		if (magic != VIRTIO_MMIO_MAGIC) {
			fail("virtio 0x%lx bad magic 0x%x", base, magic);
			continue;
		}
		u32 version = mmio_read32(base, VIRTIO_MMIO_VERSION);
		u32 id = mmio_read32(base, VIRTIO_MMIO_DEVICE_ID);
		say("virtio 0x%lx id=%u version=%u", base, id, version);
		if (version != 2) {
			fail("virtio 0x%lx version %u: only virtio-mmio version 2 is supported", base,
			     version);
			continue;
		}
		if (id == VIRTIO_ID_VSOCK && !vsock_dev->base)
			*vsock_dev = (struct virtio_dev){ base, id, "vsock" };
		else if (id == VIRTIO_ID_FS && !fs_dev->base)
			*fs_dev = (struct virtio_dev){ base, id, "fs" };
	}
}

/* Resets the machine through the i8042 (or halts with probe.end=halt, or crashes the
 * CPU with probe.end=triple-fault: an empty IDT makes the breakpoint unhandleable). */
static void __attribute__((noreturn)) finish(void)
{
	say("done");
	if (opts.end_triple) {
		static const struct __attribute__((packed)) {
			u16 limit;
			u64 base;
		} empty_idt = { 0, 0 };
		__asm__ volatile("lidt %0; int3" : : "m"(empty_idt) : "memory");
	}
	if (!opts.end_halt)
		outb(0x64, 0xfe); /* i8042: pulse the CPU reset line */
	halt_forever();
}

void probe_main(u64 info, u32 mode)
{
	say("start");
	if (mode == BOOT_PVH)
		read_pvh_boot(info);
	else
		read_linux_boot(info);

	parse_cmdline();

	struct virtio_dev vsock_dev = { 0 }, fs_dev = { 0 };
	discover_virtio(&vsock_dev, &fs_dev);

	if (opts.fs) {
		if (fs_dev.base)
			run_fs(&fs_dev);
		else
			fail("fs requested but no virtio-fs (id 26) device");
	}
	if (opts.vsock) {
		if (vsock_dev.base)
			run_vsock(&vsock_dev, opts.vsock_port);
		else
			fail("vsock requested but no virtio-vsock (id 19) device");
	}
	finish();
}
