//! The metal client task: exercises the services it is granted and logs each result.
#![no_std]
#![no_main]

use pv_metal_tasks::log;
use pv_metal_tasks::TaskBoot;

pv_metal_tasks::task_main!(main);

fn main(boot: &TaskBoot) -> u64 {
    log!(
        "{}: started (restarts {}), {} slots",
        boot.name,
        boot.restarts,
        boot.slots.len()
    );
    0
}
