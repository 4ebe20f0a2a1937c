fn main() {
    eprintln!("hull-vmm: not implemented yet; hull uses the QEMU backend (see README)");
    std::process::exit(2);
}
