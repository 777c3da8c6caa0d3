//! CPU reference ops: f32 math, multi-threaded where it pays. The oracle for every backend.
