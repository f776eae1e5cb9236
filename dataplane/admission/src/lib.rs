//! Admission and scheduling for the Mantle router (being written).
