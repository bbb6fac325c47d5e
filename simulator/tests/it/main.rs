//! `tessera-sim` run as a program.

mod whatif;
