//! Faults that this crate's own tests inject (feature `test-hooks`, on only through the
//! dev-dependency): a device error at a named point of a call, on one thread, to check that the
//! ranks of a process group fail together when one rank's reduction or update fails. Without the
//! feature, [`check`] does nothing.

use candle_core::Result;

#[cfg(feature = "test-hooks")]
thread_local! {
    static ARMED: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Fails once at `point` if a test armed it on this thread ([`inject`]); else nothing.
#[inline]
pub(crate) fn check(point: &'static str) -> Result<()> {
    #[cfg(feature = "test-hooks")]
    {
        let armed = ARMED.with(|a| {
            let mut a = a.borrow_mut();
            let found = a.iter().position(|p| *p == point);
            found.map(|i| a.remove(i))
        });
        if armed.is_some() {
            candle_core::bail!("injected fault at {point} (a simulated device error)")
        }
    }
    let _ = point;
    Ok(())
}

/// Not part of the API (hidden; feature `test-hooks`, for this crate's tests): the next call on
/// this thread that reaches `point` fails there as a device error would. Points: `"reduction"`
/// (a norm's first reduction), `"rescue"` (the rescue pass of a norm whose sum of powers left
/// the `f64` range), `"update"` (a fused optimizer's update, after the clip's collective),
/// `"scale"` (the scale pass of a clip across ranks, after its collective).
///
/// ```
/// candle_grad_clip::__inject_fault("reduction");
/// let w = candle_core::Var::new(&[1f32], &candle_core::Device::Cpu)?;
/// let mut grads = candle_core::backprop::GradStore::default();
/// grads.insert(&w, candle_core::Tensor::new(&[1f32], &candle_core::Device::Cpu)?);
/// assert!(candle_grad_clip::total_norm(&[w.clone()], &grads, candle_grad_clip::NormType::L2, false).is_err());
/// assert!(candle_grad_clip::total_norm(&[w], &grads, candle_grad_clip::NormType::L2, false).is_ok());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn __inject_fault(point: &'static str) {
    ARMED.with(|a| a.borrow_mut().push(point));
}
