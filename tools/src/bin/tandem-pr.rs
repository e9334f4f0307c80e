//! `tandem-pr`: SCSI-3 and NVMe persistent reservations from the command line,
//! sg_persist-compatible, plus tandem's fencing tasks (see `tandem_tools::pr`).

fn main() {
    std::process::exit(tandem_tools::pr::main());
}
