// Tooltips for Easel's buttons (as A1111's hints.js): window.easelHints (ui/icons.py) gives them by element id and
// by id suffix; an element keeps a title of its own. Icon-only buttons get the tooltip as their accessible name.
(() => {
  const apply = () => {
    const hints = window.easelHints || {ids: {}, suffixes: {}};
    document.querySelectorAll("[id]").forEach((el) => {
      if (el.dataset.easelHinted) return;
      let tip = hints.ids[el.id];
      if (!tip) {
        const suffix = Object.keys(hints.suffixes).find((s) => el.id.endsWith(s));
        tip = suffix ? hints.suffixes[suffix] : null;
      }
      if (!tip) return;
      el.dataset.easelHinted = "1";
      if (!el.title) el.title = tip;
      if (!el.getAttribute("aria-label")) el.setAttribute("aria-label", tip);
    });
  };
  let timer = null;
  new MutationObserver(() => { clearTimeout(timer); timer = setTimeout(apply, 150); })
    .observe(document.documentElement, {childList: true, subtree: true});
  document.addEventListener("DOMContentLoaded", apply);
})();
