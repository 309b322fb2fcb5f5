// The Settings tab as AUTOMATIC1111 1.10 has it: one section at a time, picked in the sidebar
// (#settings_sections), and a search box (#settings_search) that shows the settings whose label holds the typed text,
// across every section. What is hidden is written as CSS rules into one <style> element, so Gradio's own rendering of
// the fields is never touched (ui/settings_tab.py: the sections' columns are #settings_section_<name>, the fields
// #settings_<key>).
(() => {
  // the sidebar: one section name a line
  const layout = document.createElement("style");
  layout.textContent = "#settings_sections .wrap { flex-direction: column; align-items: stretch; }";
  document.head.appendChild(layout);
  const sectionId = (name) => "settings_section_" + name.toLowerCase().replace(/[^a-z0-9_]+/g, "_");
  const styleElement = () => {
    let el = document.getElementById("easel_settings_filter");
    if (!el) {
      el = document.createElement("style");
      el.id = "easel_settings_filter";
      document.head.appendChild(el);
    }
    return el;
  };
  const searchBox = () => document.querySelector("#settings_search textarea, #settings_search input");
  const chosenSection = () => {
    const checked = document.querySelector("#settings_sections input[type=radio]:checked");
    return checked ? checked.value : null;
  };
  // the fields of a section: its outermost elements with a settings_<key> id
  const fields = (section) => Array.from(section.querySelectorAll("[id^=settings_]")).filter((el) => {
    for (let up = el.parentElement; up && up !== section; up = up.parentElement) {
      if (up.id && up.id.startsWith("settings_")) return false;
    }
    return true;
  });

  function refresh() {
    const query = (searchBox()?.value || "").trim().toLowerCase();
    const rules = [];
    if (query) {
      document.querySelectorAll(".easel-settings-section").forEach((section) => {
        let shown = 0;
        fields(section).forEach((field) => {
          const label = (field.querySelector("label, [data-testid=block-info]")?.textContent || field.textContent)
            .toLowerCase();
          if (label.includes(query)) shown += 1;
          else rules.push(`#${CSS.escape(field.id)}`);
        });
        if (!shown) rules.push(`#${CSS.escape(section.id)}`);
      });
    } else {
      const chosen = chosenSection();
      if (chosen) rules.push(`.easel-settings-section:not(#${CSS.escape(sectionId(chosen))})`);
    }
    styleElement().textContent = rules.length ? `${rules.join(",\n")} { display: none !important; }` : "";
  }

  document.addEventListener("input", (e) => {
    if (e.target.closest && e.target.closest("#settings_search")) refresh();
  });
  document.addEventListener("change", (e) => {
    if (!e.target.closest || !e.target.closest("#settings_sections")) return;
    const box = searchBox();
    if (box && box.value) {  // picking a section ends the search, as in A1111
      box.value = "";
      box.dispatchEvent(new Event("input", { bubbles: true }));
    }
    refresh();
  });
  // the first section alone, as soon as the sidebar is on the page
  const watcher = new MutationObserver(() => {
    if (chosenSection()) {
      refresh();
      watcher.disconnect();
    }
  });
  const start = () => watcher.observe(document.body, { childList: true, subtree: true });
  if (document.body) start(); else document.addEventListener("DOMContentLoaded", start);
})();
