//! The pieces of the `harbor` binary that tests use too.

pub mod bench;
pub mod cluster;
pub mod control;
pub mod data_dir;
pub mod dev;
pub mod hosting;
pub mod members;
pub mod moves;
pub mod projection;
pub mod sink;
pub mod status;
