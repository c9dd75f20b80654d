"""Finnish (the default) and English; the browser's Accept-Language picks."""

from __future__ import annotations

LANGUAGES = ("fi", "en")

TEXT: dict[str, dict[str, str]] = {
    "title": {"fi": "Puhelutallenteet", "en": "Call recordings"},
    "sign_in": {"fi": "Kirjaudu sisään", "en": "Sign in"},
    "sign_out": {"fi": "Kirjaudu ulos", "en": "Sign out"},
    "welcome": {
        "fi": "Kirjaudu yrityksen tunnuksilla kuunnellaksesi puhelutallenteita.",
        "en": "Sign in with your company account to listen to call recordings.",
    },
    "not_in_directory": {
        "fi": "Tunnuksesi ei ole puhelutallenteiden henkilöluettelossa, joten et voi "
        "käyttää tallenteita. Ota yhteys esimieheesi tai ylläpitoon.",
        "en": "Your account is not in the call recordings' directory of people, so you "
        "cannot use the recordings. Ask your supervisor or the administrators.",
    },
    "not_trained": {
        "fi": "Henkilöluettelossa ei ole koulutuspäivää sinulle. Tallenteita saa käyttää "
        "vasta järjestelmän käyttöön liittyvän koulutuksen jälkeen.",
        "en": "The directory has no training date for you. Recordings may be used only "
        "after the training for this system.",
    },
    "no_access": {"fi": "Ei pääsyä", "en": "No access"},
    "signed_out": {"fi": "Olet kirjautunut ulos.", "en": "You have signed out."},
    "session_over": {
        "fi": "Istunto päättyi. Kirjaudu uudelleen.",
        "en": "Your session has ended. Please sign in again.",
    },
    "my_calls": {"fi": "Omat puheluni", "en": "My calls"},
    "team_calls": {"fi": "Tiimini puhelut", "en": "My team's calls"},
    "all_calls": {"fi": "Kaikki puhelut", "en": "All calls"},
    "search": {"fi": "Hae", "en": "Search"},
    "from": {"fi": "Alkaen", "en": "From"},
    "until": {"fi": "Päättyen", "en": "Until"},
    "date_hint": {"fi": "pp.kk.vvvv tt:mm", "en": "dd.mm.yyyy hh:mm"},
    "employee": {"fi": "Työntekijä", "en": "Employee"},
    "team": {"fi": "Tiimi", "en": "Team"},
    "employees": {"fi": "Työntekijät", "en": "Employees"},
    "direction": {"fi": "Suunta", "en": "Direction"},
    "any": {"fi": "Kaikki", "en": "Any"},
    "inbound": {"fi": "Saapuva", "en": "Inbound"},
    "outbound": {"fi": "Lähtevä", "en": "Outbound"},
    "flags": {"fi": "Merkinnät", "en": "Flags"},
    "paused": {"fi": "Tauot (hiljaisuutta)", "en": "Paused (silence)"},
    "customer": {"fi": "Asiakas", "en": "Customer"},
    "masked_hint": {"fi": "esim. +358401234***", "en": "e.g. +358401234***"},
    "service_number": {"fi": "Palvelunumero", "en": "Service number"},
    "started": {"fi": "Alkoi", "en": "Started"},
    "duration": {"fi": "Kesto", "en": "Duration"},
    "state": {"fi": "Tila", "en": "State"},
    "restricted": {"fi": "Käsittely rajoitettu", "en": "Processing restricted"},
    "on_hold": {"fi": "Lakisääteinen säilytys", "en": "Legal hold"},
    "none_found": {"fi": "Ei tallenteita näillä ehdoilla.", "en": "No recordings match."},
    "next_page": {"fi": "Seuraava sivu", "en": "Next page"},
    "prev_page": {"fi": "Ensimmäinen sivu", "en": "First page"},
    "page": {"fi": "Sivu", "en": "Page"},
    "open": {"fi": "Avaa", "en": "Open"},
    "recording": {"fi": "Tallenne", "en": "Recording"},
    "destroyed_on": {"fi": "Hävitetään", "en": "Destroyed on"},
    "kept_while_held": {
        "fi": "säilytetään, kunnes säilytys puretaan",
        "en": "kept until the hold is released",
    },
    "purpose": {"fi": "Käyttötarkoitus", "en": "Purpose"},
    "purpose_first": {
        "fi": "Valitse käyttötarkoitus ennen kuuntelua. Valinta kirjataan lokiin.",
        "en": "Choose the purpose before listening. Your choice is logged.",
    },
    "start_listening": {"fi": "Aloita kuuntelu", "en": "Start listening"},
    "verification": {"fi": "Sanotun todentaminen", "en": "Verify what was said"},
    "legal": {"fi": "Oikeudelliset vaatimukset", "en": "Legal claims and requests"},
    "training": {"fi": "Henkilöstön koulutus", "en": "Staff training"},
    "security": {"fi": "Tietoturva ja väärinkäytösten estäminen", "en": "Security and misuse"},
    "listening_for": {"fi": "Kuuntelun tarkoitus", "en": "Listening for"},
    "speed": {"fi": "Nopeus", "en": "Speed"},
    "both": {"fi": "Molemmat", "en": "Both"},
    "customer_only": {"fi": "Vain asiakas", "en": "Customer only"},
    "employee_only": {"fi": "Vain työntekijä", "en": "Employee only"},
    "listen_to": {"fi": "Kuuntele", "en": "Listen to"},
    "skip_silence": {"fi": "Ohita hiljaisuus", "en": "Skip silence"},
    "restricted_note": {
        "fi": "Käsittelyä on rajoitettu: ääntä kuuntelee vain tietosuojavastaava "
        "oikeudellisiin tarkoituksiin.",
        "en": "Processing is restricted: only the privacy officer listens, for legal purposes.",
    },
    "no_audio": {
        "fi": "Et voi kuunnella tätä tallennetta tällä käyttötarkoituksella.",
        "en": "You cannot listen to this recording for this purpose.",
    },
    "not_found": {"fi": "Tallennetta ei löydy", "en": "Recording not found"},
    "not_found_text": {
        "fi": "Tallennetta ei ole, tai sinulla ei ole oikeutta nähdä sitä.",
        "en": "The recording does not exist, or you may not see it.",
    },
    "bad_request": {"fi": "Virheellinen pyyntö", "en": "Bad request"},
    "back": {"fi": "Takaisin hakuun", "en": "Back to search"},
    "joined": {"fi": "liittyi", "en": "joined"},
    "unavailable": {
        "fi": "Tallennepalvelu ei vastaa juuri nyt. Yritä hetken kuluttua uudelleen.",
        "en": "The recording store does not answer right now. Try again shortly.",
    },
    "role_agent": {"fi": "asiakaspalvelija", "en": "agent"},
    "role_supervisor": {"fi": "esimies", "en": "supervisor"},
    "role_admin": {"fi": "ylläpitäjä", "en": "administrator"},
    "role_privacy_officer": {"fi": "tietosuojavastaava", "en": "privacy officer"},
    "officer_only": {
        "fi": "Tämä sivu on tietosuojavastaavalle.",
        "en": "This page is for the privacy officer.",
    },
    "choose_recordings": {
        "fi": "Valitse ainakin yksi tallenne ja anna asian tunnus.",
        "en": "Choose at least one recording and give the case reference.",
    },
    "cases": {"fi": "Tietopyynnöt", "en": "Data subject requests"},
    "case_ref": {"fi": "Asian tunnus", "en": "Case reference"},
    "case_hint": {"fi": "esim. TP-2026-0042", "en": "e.g. DSR-2026-0042"},
    "number": {"fi": "Asiakkaan puhelinnumero", "en": "Customer's phone number"},
    "number_hint": {
        "fi": "missä muodossa tahansa; ei tallenneta eikä näytetä",
        "en": "in any format; not stored or shown",
    },
    "call_time": {"fi": "Puhelun aika", "en": "Time of the call"},
    "window": {"fi": "± minuuttia", "en": "± minutes"},
    "find": {"fi": "Etsi puhelut", "en": "Find the calls"},
    "found": {"fi": "Löydetyt puhelut", "en": "Calls found"},
    "none_for_number": {
        "fi": "Tällä numerolla ei löytynyt puheluita tuolta ajalta.",
        "en": "No calls from this number around that time.",
    },
    "export": {"fi": "Vie paketti (ZIP)", "en": "Export package (ZIP)"},
    "restrict": {"fi": "Rajoita käsittelyä", "en": "Restrict"},
    "unrestrict": {"fi": "Poista rajoitus", "en": "Lift restriction"},
    "hold": {"fi": "Aseta säilytys", "en": "Legal hold"},
    "release": {"fi": "Pura säilytys", "en": "Release hold"},
    "unseal": {"fi": "Näytä numeron loppu", "en": "Unseal last digits"},
    "erase": {"fi": "Poista pysyvästi", "en": "Erase"},
    "erase_confirm": {
        "fi": "Seuraavat tallenteet hävitetään pysyvästi. Ääntä ei voi palauttaa; "
        "lokiin jää vain kuka, mitä ja miksi.",
        "en": "These recordings will be destroyed for good. The audio cannot be "
        "recovered; the audit log keeps only who, what and why.",
    },
    "held_first": {
        "fi": "Tallenne on lakisääteisessä säilytyksessä, eikä sitä poistettu. Pura "
        "säilytys ensin.",
        "en": "The recording is on legal hold and was not erased. Release the hold first.",
    },
    "erase_yes": {"fi": "Kyllä, poista pysyvästi", "en": "Yes, erase for good"},
    "cancel": {"fi": "Peruuta", "en": "Cancel"},
    "done": {"fi": "Tehty", "en": "Done"},
    "unsealed": {"fi": "Koko numero", "en": "Full number"},
    "select": {"fi": "Valitse", "en": "Select"},
    "audit": {"fi": "Lokitiedot", "en": "Audit log"},
    "audit_only": {
        "fi": "Lokitiedot ovat tietosuojavastaavalle ja ylläpidolle.",
        "en": "The audit log is for the privacy officer and the administrators.",
    },
    "recording_id": {"fi": "Tallenteen tunnus", "en": "Recording id"},
    "person_id": {"fi": "Henkilön tunnus", "en": "Person id"},
    "verify_chain": {"fi": "Tarkista ketju", "en": "Verify the chain"},
    "head": {"fi": "Ketjun pää", "en": "Chain head"},
    "chain_ok": {"fi": "Ketju ehjä", "en": "Chain intact"},
    "chain_bad": {"fi": "Ketju rikki", "en": "Chain broken"},
    "csv": {"fi": "Lataa CSV", "en": "Download CSV"},
    "when": {"fi": "Aika", "en": "When"},
    "who": {"fi": "Kuka", "en": "Who"},
    "channel": {"fi": "Kanava", "en": "Channel"},
    "what": {"fi": "Mitä", "en": "What"},
    "outcome": {"fi": "Tulos", "en": "Outcome"},
    "detail": {"fi": "Lisätiedot", "en": "Detail"},
    "local_signin": {
        "fi": "Demon paikallinen kirjautuminen: valitse henkilö. Tuotannossa kirjaudutaan "
        "yrityksen tunnuksilla (OpenID Connect).",
        "en": "The demo's local sign-in: choose a person. In production people sign in "
        "with the company's accounts (OpenID Connect).",
    },
    "csrf": {
        "fi": "Lomake vanhentui. Lataa sivu uudelleen ja yritä uudestaan.",
        "en": "The form has expired. Reload the page and try again.",
    },
}

FLAGS: dict[str, dict[str, str]] = {
    "metadata_invalid": {"fi": "puhelun tiedot puutteelliset", "en": "call metadata missing"},
    "employee_unknown": {"fi": "työntekijä tuntematon", "en": "employee unknown"},
    "customer_withheld": {"fi": "asiakkaan numero salattu", "en": "customer number withheld"},
    "customer_unknown": {"fi": "asiakkaan numero tuntematon", "en": "customer number unknown"},
    "service_unknown": {"fi": "palvelunumero tuntematon", "en": "service number unknown"},
    "incomplete": {"fi": "tallenne keskeytyi", "en": "recording incomplete"},
    "rtp_timeout": {"fi": "ääni katkesi", "en": "audio stopped"},
    "silent_customer": {"fi": "asiakkaan kanava hiljainen", "en": "customer channel silent"},
    "silent_employee": {"fi": "työntekijän kanava hiljainen", "en": "employee channel silent"},
    "length_mismatch": {"fi": "kanavat eripituiset", "en": "channels differ in length"},
    "paused": {"fi": "tallennus tauotettu", "en": "recording paused"},
}


def pick_language(accept_language: str) -> str:
    """The first supported language of the header by quality; Finnish by default."""
    best, best_q = "fi", -1.0
    for position, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        lang = tag.strip().lower().split("-")[0]
        try:
            q = float(params.strip()[2:]) if params.strip().startswith("q=") else 1.0
        except ValueError:
            q = 0.0
        if q <= 0:  # "not acceptable"
            continue
        q -= position * 1e-6
        if lang in LANGUAGES and q > best_q:
            best, best_q = lang, q
    return best


def translator(lang: str) -> dict[str, str]:
    return {key: texts[lang] for key, texts in TEXT.items()}


def flag_words(flags: list[str], lang: str) -> list[str]:
    return [FLAGS.get(f, {}).get(lang, f.replace("_", " ")) for f in flags]
