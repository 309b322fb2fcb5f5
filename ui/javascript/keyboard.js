// Easel's keyboard habits from AUTOMATIC1111, on the txt2img and img2img tabs:
//   Ctrl+Enter or Alt+Enter in a prompt box: Generate;  Esc: Interrupt the running job;
//   Ctrl+Up / Ctrl+Down in a prompt box: more / less emphasis for the selection or the word at the cursor,
//     "(word:1.1)" by the keyedit_precision_attention step, "<lora:name:0.8>" by keyedit_precision_extra;
//   right-click on Generate: "Generate forever" and "Cancel generate forever".
// Settings arrive in window.easelOpts (ui/page_scripts.py fills it when the page loads).
(() => {
  const opt = (key, fallback) => {
    const value = (window.easelOpts || {})[key];
    return value === undefined || value === null ? fallback : value;
  };
  const TABS = ["txt2img", "img2img"];
  const visible = (el) => !!el && el.offsetParent !== null;
  const currentTab = () => TABS.find((t) => visible(document.getElementById(`${t}_generate`)));
  const running = (tab) => !!document.querySelector(`#${tab}_progress .easel-progress`);
  const promptTab = (el) => {
    if (!el || el.tagName !== "TEXTAREA") return null;
    const box = el.closest(TABS.flatMap((t) => [`#${t}_prompt`, `#${t}_neg_prompt`]).join(","));
    return box ? box.id.split("_")[0] : null;
  };
  const press = (id) => { const b = document.getElementById(id); if (b) b.click(); };

  // ---- emphasis ---------------------------------------------------------------------------------------
  const round = (x) => parseFloat(x.toPrecision(12));
  const formatWeight = (w) => (Number.isInteger(w) ? `${w}.0` : String(w));

  function enclosingBlock(text, pos, open, close) {
    const before = text.lastIndexOf(open, pos - 1);
    if (before < 0 || text.lastIndexOf(close, pos - 1) > before) return null;
    const after = text.indexOf(close, pos);
    if (after < 0) return null;
    const nextOpen = text.indexOf(open, pos);
    if (nextOpen >= 0 && nextOpen < after) return null;
    return [before + 1, after];
  }

  function wordAt(text, pos) {
    const delimiters = String(opt("keyedit_delimiters", ".,\\/!?%^*;:{}=`~() "));
    const isDelimiter = (c) => delimiters.includes(c) || /\s/.test(c);
    let start = pos, end = pos;
    while (start > 0 && !isDelimiter(text[start - 1])) start--;
    while (end < text.length && !isDelimiter(text[end])) end++;
    return start < end ? [start, end] : null;
  }

  function editAttention(area, up) {
    let text = area.value, start = area.selectionStart, end = area.selectionEnd;
    if (start === end) {
      const lora = enclosingBlock(text, start, "<", ">");
      const paren = lora ? null : enclosingBlock(text, start, "(", ")");
      const span = lora || paren || wordAt(text, start);
      if (!span) return false;
      [start, end] = span;
    }
    while (start < end && /\s/.test(text[start])) start++;
    while (end > start && /\s/.test(text[end - 1])) end--;
    if (start === end) return false;

    if (text[start - 1] === "<" && text[end] === ">") {  // an extra network: its last ":weight"
      const m = /^(.*:)(-?[\d.]+)$/.exec(text.slice(start, end));
      if (!m) return false;
      const step = parseFloat(opt("keyedit_precision_extra", 0.05));
      const weight = round(parseFloat(m[2]) + (up ? step : -step));
      const inner = m[1] + formatWeight(weight);
      text = text.slice(0, start) + inner + text.slice(end);
      end = start + inner.length;
    } else {
      const selected = text.slice(start, end);
      const inside = /^(.*):(-?[\d.]+)$/.exec(selected);  // "(word:1.1)" picked whole by the cursor
      if (text[start - 1] === "(" && text[end] === ")" && inside) end = start + inside[1].length;
      const step = parseFloat(opt("keyedit_precision_attention", 0.1));
      const tail = /^:(-?[\d.]+)\)/.exec(text.slice(end));
      if (text[start - 1] === "(" && tail) {  // already weighted: change the number
        const weight = round(parseFloat(tail[1]) + (up ? step : -step));
        if (weight === 1) {  // back to plain text, as A1111 does
          text = text.slice(0, start - 1) + text.slice(start, end) + text.slice(end + tail[0].length);
          start -= 1; end -= 1;
        } else {
          text = text.slice(0, end) + ":" + formatWeight(weight) + ")" + text.slice(end + tail[0].length);
        }
      } else {
        const weight = round(1 + (up ? step : -step));
        text = text.slice(0, start) + "(" + text.slice(start, end) + ":" + formatWeight(weight) + ")" + text.slice(end);
        start += 1; end += 1;
      }
    }
    area.value = text;
    area.setSelectionRange(start, end);
    area.dispatchEvent(new Event("input", {bubbles: true}));
    return true;
  }

  document.addEventListener("keydown", (e) => {
    const tab = promptTab(e.target);
    if (tab && e.key === "Enter" && (e.ctrlKey || e.metaKey || e.altKey)) {
      e.preventDefault(); e.stopPropagation();
      press(`${tab}_generate`);
      return;
    }
    if (tab && (e.key === "ArrowUp" || e.key === "ArrowDown") && (e.ctrlKey || e.metaKey)) {
      if (editAttention(e.target, e.key === "ArrowUp")) { e.preventDefault(); e.stopPropagation(); }
      return;
    }
    if (e.key === "Escape") {
      if (document.querySelector(".easel-context-menu")) { closeMenu(); return; }
      const current = currentTab();
      if (current && running(current)) { e.preventDefault(); press(`${current}_interrupt`); }
    }
  }, true);

  // ---- generate forever ---------------------------------------------------------------------------------
  const forever = {};  // tab -> {timer, sawRunning, clicked}
  window.easelGenerateForever = forever;
  const sawRunningWatch = {};

  function watchProgress(tab) {
    if (sawRunningWatch[tab]) return;
    const target = document.getElementById(`${tab}_progress`);
    if (!target) return;
    sawRunningWatch[tab] = new MutationObserver(() => {
      if (forever[tab] && running(tab)) forever[tab].sawRunning = true;
    });
    sawRunningWatch[tab].observe(target, {childList: true, subtree: true});
  }

  function startForever(tab) {
    if (forever[tab]) return;
    watchProgress(tab);
    const state = {sawRunning: false, clicked: false, timer: null};
    forever[tab] = state;
    const info = () => (document.getElementById(`${tab}_info`) || {}).innerHTML;
    const tick = () => {
      if (forever[tab] !== state) return;
      if (running(tab)) { state.sawRunning = true; return; }
      // the last press's job is over when its progress came and went, or the info area changed (a result, or an
      // error shown at once); until then, wait
      if (state.clicked && !state.sawRunning && info() === state.infoBefore) return;
      if (state.clicked && document.querySelector(`#${tab}_info .easel-error`)) { stopForever(tab); return; }
      state.clicked = true; state.sawRunning = false; state.infoBefore = info();
      press(`${tab}_generate`);
    };
    state.timer = setInterval(tick, 500);
    tick();
  }

  function stopForever(tab) {
    const state = forever[tab];
    if (state) clearInterval(state.timer);
    delete forever[tab];
  }

  function closeMenu() { document.querySelectorAll(".easel-context-menu").forEach((m) => m.remove()); }

  function showMenu(tab, x, y) {
    closeMenu();
    const menu = document.createElement("div");
    menu.className = "easel-context-menu";
    menu.id = `${tab}_generate_menu`;
    menu.setAttribute("role", "menu");
    menu.style.cssText = `position:fixed; left:${x}px; top:${y}px; z-index:10000; background:var(--block-background-fill, #fff);`
      + "border:1px solid var(--border-color-primary, #888); border-radius:6px; padding:4px 0; min-width:200px;"
      + "box-shadow:0 4px 12px rgba(0,0,0,.25); font-size:14px;";
    const item = (label, action) => {
      const el = document.createElement("div");
      el.textContent = label;
      el.setAttribute("role", "menuitem");
      el.style.cssText = "padding:6px 14px; cursor:pointer; color:var(--body-text-color, #111);";
      el.addEventListener("mouseenter", () => { el.style.background = "var(--color-accent-soft, #ddd)"; });
      el.addEventListener("mouseleave", () => { el.style.background = ""; });
      el.addEventListener("click", () => { closeMenu(); action(); });
      menu.appendChild(el);
    };
    item("Generate forever", () => startForever(tab));
    item("Cancel generate forever", () => stopForever(tab));
    document.body.appendChild(menu);
  }

  document.addEventListener("contextmenu", (e) => {
    const button = e.target.closest && e.target.closest(TABS.map((t) => `#${t}_generate`).join(","));
    if (!button) return;
    e.preventDefault();
    showMenu(button.id.split("_")[0], e.clientX, e.clientY);
  }, true);
  document.addEventListener("click", (e) => {
    // a person's click elsewhere closes the menu; generate forever's own presses of Generate do not
    if (e.isTrusted && (!e.target.closest || !e.target.closest(".easel-context-menu"))) closeMenu();
  });
})();
