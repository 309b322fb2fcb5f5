// The extra-networks cards (ui/extra_networks.py) write into the prompt box of their tab that had the focus
// last, as AUTOMATIC1111 does: remembered here from the page's start, by tab ("txt2img" / "img2img").
window.easelPromptTargets = window.easelPromptTargets || {};
document.addEventListener('focusin', (e) => {
  if (!e.target || e.target.tagName !== 'TEXTAREA') return;
  const box = e.target.closest('#txt2img_prompt, #txt2img_neg_prompt, #img2img_prompt, #img2img_neg_prompt');
  if (box) window.easelPromptTargets[box.id.split('_')[0]] = box.id;
});
