//! Norm clipping across processes: [`clip_grad_norm_across_`] and the [`ClipGradNorm`] methods
//! that take a process group (the norm itself is `dist`'s).

use candle_core::{backprop::GradStore, Result, Tensor, Var};

use super::norm::ClipGradNorm;
use crate::dist::agreement::{Agreement, Call};
use crate::dist::{self, ProcessGroup};

impl ClipGradNorm {
    /// [`clip_`](Self::clip_) with the norm taken over the gradients of every rank of `group`
    /// (see [`total_norm_across`](crate::total_norm_across)): every rank passes the vars it owns,
    /// and every rank gets the same norm and scales its own gradients by the same coefficient.
    /// With `error_if_nonfinite`, every rank fails alike.
    ///
    /// **Ranks fail together and agree.** Every check that can refuse a rank's call (the
    /// settings, the gradients, their device) runs before the collective, and its outcome travels
    /// in it: when one rank is refused, every rank returns an error (the refused rank its own, the
    /// others one that names it and the kind of failure), and no gradient is modified on any
    /// rank. The settings that must be equal on every rank (norm type, `max_norm`, `eps`,
    /// `error_if_nonfinite`, the number of replicated vars) travel as a fingerprint in the same
    /// collective: ranks that differ all fail, naming the first rank and setting that differ
    /// from rank 0's. A device error in the scale pass, after the collective, fails that rank
    /// only: its gradients may be partly scaled, the other ranks' are scaled.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// use candle_grad_clip::{ClipGradNorm, LocalGroup, NormType};
    /// # fn main() -> candle_core::Result<()> {
    /// let norms = std::thread::scope(|s| {
    ///     let handles: Vec<_> = LocalGroup::new(2)?
    ///         .into_iter()
    ///         .zip([-8f32, 2.])
    ///         .map(|(group, g)| {
    ///             s.spawn(move || -> candle_core::Result<f32> {
    ///                 let w = Var::new(&[0f32], &Device::Cpu)?;
    ///                 let mut grads = GradStore::default();
    ///                 grads.insert(&w, Tensor::new(&[g], &Device::Cpu)?);
    ///                 let clip = ClipGradNorm::new(4.0).with_norm_type(NormType::Inf).with_eps(0.0);
    ///                 clip.clip_across_(&[w.clone()], &mut grads, &group)?;
    ///                 grads.get(&w).unwrap().to_vec1::<f32>().map(|v| v[0])
    ///             })
    ///         })
    ///         .collect();
    ///     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
    /// })?;
    /// assert_eq!(norms, [-4.0, 1.0]); // the global Inf norm 8 clipped to 4 on both ranks
    /// # Ok(()) }
    /// ```
    pub fn clip_across_(
        &self,
        vars: &[Var],
        grads: &mut GradStore,
        group: &dyn ProcessGroup,
    ) -> Result<Tensor> {
        self.clip_replicated_across_(vars, &[], grads, group)
    }

    /// [`clip_across_`](Self::clip_across_) with parameters replicated on every rank: `owned` are
    /// this rank's own vars, `replicated` the vars every rank holds a copy of, with the same
    /// gradient on every rank (after an all-reduce of the gradients, say). A replicated var is
    /// counted once in the norm (rank 0 counts it) and scaled on every rank. Every rank must pass
    /// the same `replicated` vars.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// use candle_grad_clip::{ClipGradNorm, LocalGroup};
    /// # fn main() -> candle_core::Result<()> {
    /// let norms = std::thread::scope(|s| {
    ///     let handles: Vec<_> = LocalGroup::new(3)?
    ///         .into_iter()
    ///         .map(|group| {
    ///             s.spawn(move || -> candle_core::Result<f32> {
    ///                 // Each rank owns a 1 and shares a bias whose gradient is 1 everywhere.
    ///                 let (own, bias) = (Var::new(&[0f32], &Device::Cpu)?, Var::new(&[0f32], &Device::Cpu)?);
    ///                 let mut grads = GradStore::default();
    ///                 grads.insert(&own, Tensor::new(&[1f32], &Device::Cpu)?);
    ///                 grads.insert(&bias, Tensor::new(&[1f32], &Device::Cpu)?);
    ///                 let norm = ClipGradNorm::new(f64::INFINITY)
    ///                     .clip_replicated_across_(&[own], &[bias], &mut grads, &group)?;
    ///                 norm.to_scalar::<f32>()
    ///             })
    ///         })
    ///         .collect();
    ///     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
    /// })?;
    /// assert_eq!(norms, [2.0; 3]); // sqrt(1 + 1 + 1 + 1): the bias counted once
    /// # Ok(()) }
    /// ```
    pub fn clip_replicated_across_(
        &self,
        owned: &[Var],
        replicated: &[Var],
        grads: &mut GradStore,
        group: &dyn ProcessGroup,
    ) -> Result<Tensor> {
        // The settings are checked with the gradients, inside: a refused rank still takes part in
        // the collective, so that every rank fails with it.
        dist::clip_across(
            owned,
            replicated,
            grads,
            self.settings(),
            self.validate(),
            Agreement::new(Call::ClipNorm),
            None,
            group,
        )
    }
}

/// Rescales the gradients of `vars` on every rank of `group` so that their global L2 norm (over
/// all ranks) is at most `max_norm`, and returns that norm before clipping, the same on every
/// rank: [`clip_grad_norm_`](crate::clip_grad_norm_) for gradients spread over processes. Every
/// rank scales its own gradients by the same coefficient, so the gradients are bitwise those of
/// the one-process call whenever the norm is (see [`total_norm_across`](crate::total_norm_across)).
///
/// The same as `ClipGradNorm::new(max_norm).clip_across_(vars, grads, group)`; use
/// [`ClipGradNorm`](crate::ClipGradNorm) for the other options and for replicated parameters.
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::{clip_grad_norm_across_, LocalGroup};
/// # fn main() -> candle_core::Result<()> {
/// let results = std::thread::scope(|s| {
///     let handles: Vec<_> = LocalGroup::new(2)?
///         .into_iter()
///         .zip([30f32, 40.])
///         .map(|(group, g)| {
///             s.spawn(move || -> candle_core::Result<(f32, f32)> {
///                 let w = Var::new(&[0f32], &Device::Cpu)?;
///                 let mut grads = GradStore::default();
///                 grads.insert(&w, Tensor::new(&[g], &Device::Cpu)?);
///                 let norm = clip_grad_norm_across_(&[w.clone()], &mut grads, 1.0, &group)?;
///                 let clipped = grads.get(&w).unwrap().to_vec1::<f32>()?[0];
///                 Ok((norm.to_scalar::<f32>()?, clipped))
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
/// })?;
/// // Norm 50 on both ranks; the gradients become 0.6 and 0.8 (up to the 1e-6 of eps).
/// assert_eq!((results[0].0, results[1].0), (50.0, 50.0));
/// assert!((results[0].1 - 0.6).abs() < 1e-6 && (results[1].1 - 0.8).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn clip_grad_norm_across_(
    vars: &[Var],
    grads: &mut GradStore,
    max_norm: f64,
    group: &dyn ProcessGroup,
) -> Result<Tensor> {
    ClipGradNorm::new(max_norm).clip_across_(vars, grads, group)
}
