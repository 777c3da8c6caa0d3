//! Shape-checked weight loading from a [`TensorSource`] for the model's constructors.

use super::ModelError;
use crate::weights::TensorSource;

/// Loads `name` and checks its shape is exactly `shape`.
pub(crate) fn exact(
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, ModelError> {
    let t = src.load(name)?;
    check(name, t.shape(), shape)?;
    Ok(t.into_data())
}

/// Loads `[start, end)` of dimension `dim` of `name`, whose full shape must be `full`.
pub(crate) fn slice(
    src: &dyn TensorSource,
    name: &str,
    full: &[usize],
    dim: usize,
    start: usize,
    end: usize,
) -> Result<Vec<f32>, ModelError> {
    if start == 0 && end == full[dim] {
        return exact(src, name, full);
    }
    let t = src.load_slice(name, dim, start, end)?;
    let mut want = full.to_vec();
    want[dim] = end - start;
    check(name, t.shape(), &want)?;
    Ok(t.into_data())
}

fn check(name: &str, got: &[usize], want: &[usize]) -> Result<(), ModelError> {
    if got != want {
        return Err(ModelError::Shape {
            name: name.into(),
            got: got.to_vec(),
            want: want.to_vec(),
        });
    }
    Ok(())
}
