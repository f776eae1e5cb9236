//! AWS wire formats for the Mantle router (being written).
