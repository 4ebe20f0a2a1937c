/*
 * entry.S - entry points of the Hull probe guest.
 *
 * _start (the ELF e_entry) is the Linux x86_64 64-bit boot entry: long mode,
 * identity-mapped paging, interrupts off, %rsi = struct boot_params.
 *
 * pvh_start is an optional 32-bit PVH entry (only advertised to loaders when
 * the image is built with PROBE_PVH=1, see build.sh): protected mode, paging
 * off, %ebx = struct hvm_start_info. It builds its own identity map of the
 * first 4 GiB, enters long mode and joins the common C code.
 *
 * Both paths zero .bss (the stack lives there), switch to the probe's own
 * stack and call probe_main(info, mode), which never returns.
 */

#define BOOT_LINUX 0
#define BOOT_PVH   1

#define PROBE_STACK_SIZE 16384

/* ---------------------------------------------------------------------- */
/* Linux 64-bit boot entry                                                 */
/* ---------------------------------------------------------------------- */

	.section .text.entry, "ax", @progbits
	.code64
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	movq	%rsi, %r12		/* boot_params: keep it across the .bss clear */

	/* Zero .bss; rep stosb needs no stack. */
	leaq	__bss_start(%rip), %rdi
	leaq	__bss_end(%rip), %rcx
	subq	%rdi, %rcx
	xorl	%eax, %eax
	rep stosb

	leaq	probe_stack_top(%rip), %rsp
	xorl	%ebp, %ebp
	movq	%r12, %rdi		/* arg 0: boot_params */
	movl	$BOOT_LINUX, %esi	/* arg 1: boot mode */
	call	probe_main
	jmp	halt_forever
	.size _start, . - _start

	.globl halt_forever
	.type halt_forever, @function
halt_forever:
	cli
	hlt
	jmp	halt_forever
	.size halt_forever, . - halt_forever

/* ---------------------------------------------------------------------- */
/* PVH 32-bit entry                                                        */
/* ---------------------------------------------------------------------- */

	.code32
	.globl pvh_start
	.type pvh_start, @function
pvh_start:
	cli
	cld
	movl	%ebx, %esi		/* hvm_start_info: rep stosb leaves %esi alone */

	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	xorl	%eax, %eax
	rep stosb

	/* Four page directories of 512 2 MiB pages each: an identity map of 4 GiB. */
	movl	$pvh_pd, %edi
	xorl	%ecx, %ecx
1:	movl	%ecx, %eax
	shll	$21, %eax
	orl	$0x83, %eax		/* present | writable | 2 MiB page */
	movl	%eax, (%edi,%ecx,8)	/* the high half is already zero */
	incl	%ecx
	cmpl	$2048, %ecx
	jb	1b

	/* The PDPT points at the four directories, the PML4 at the PDPT. */
	movl	$pvh_pdpt, %edi
	movl	$(pvh_pd + 0x3), %eax	/* present | writable */
	xorl	%ecx, %ecx
2:	movl	%eax, (%edi,%ecx,8)
	addl	$4096, %eax
	incl	%ecx
	cmpl	$4, %ecx
	jb	2b
	movl	$(pvh_pdpt + 0x3), %eax
	movl	%eax, pvh_pml4

	/* PAE on, CR3 = PML4, EFER.LME on, then paging on: compatibility mode. */
	movl	%cr4, %eax
	orl	$0x20, %eax
	movl	%eax, %cr4
	movl	$pvh_pml4, %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx
	rdmsr
	orl	$0x100, %eax
	wrmsr
	lgdt	pvh_gdt_ptr
	movl	%cr0, %eax
	orl	$0x80000001, %eax	/* PG | PE */
	movl	%eax, %cr0
	ljmp	$0x08, $pvh_long	/* load the 64-bit code segment */

	.code64
pvh_long:
	movl	$0x10, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	leaq	probe_stack_top(%rip), %rsp
	xorl	%ebp, %ebp
	movl	%esi, %edi		/* arg 0: hvm_start_info (zero-extended) */
	movl	$BOOT_PVH, %esi		/* arg 1: boot mode */
	call	probe_main
	jmp	halt_forever
	.size pvh_start, . - pvh_start

/* The GDT for the PVH path: null, 64-bit code (0x08), flat data (0x10). The
 * accessed bits are preset so the CPU never writes to these descriptors. */
	.section .rodata
	.balign 8
pvh_gdt:
	.quad	0
	.quad	0x00af9b000000ffff
	.quad	0x00cf93000000ffff
pvh_gdt_end:
pvh_gdt_ptr:
	.word	pvh_gdt_end - pvh_gdt - 1
	.long	pvh_gdt

#ifdef PROBE_PVH_NOTE
/* XEN_ELFNOTE_PHYS32_ENTRY (18): tells PVH loaders (QEMU, Firecracker, Cloud
 * Hypervisor) where the 32-bit entry is. A 64-bit value, as Linux emits it. */
	.section .note.Xen, "a", @note
	.balign 4
	.long	4			/* namesz: "Xen\0" */
	.long	8			/* descsz */
	.long	18			/* type: XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.balign 4
	.quad	pvh_start
#endif

/* ---------------------------------------------------------------------- */
/* Stack and PVH page tables (.bss, zeroed above)                          */
/* ---------------------------------------------------------------------- */

	.section .bss
	.balign 4096
pvh_pml4:
	.skip	4096
pvh_pdpt:
	.skip	4096
pvh_pd:
	.skip	4 * 4096
	.balign 16
probe_stack:
	.skip	PROBE_STACK_SIZE
probe_stack_top:

	.section .note.GNU-stack, "", @progbits
