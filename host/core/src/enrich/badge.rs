//! Badges: `assign`, `remove`.

use super::{Parsed, Spec};
use crate::attribute::AttributeDef;
use crate::enrich::Operation;
use crate::profile::Profile;
use crate::value::AttrType;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Assign,
    Remove,
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    match ty {
        AttrType::Badge => &["assign", "remove"],
        _ => &[],
    }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    match (spec.ty, spec.op.get_ref().as_str()) {
        (AttrType::Badge, "assign") => Parsed::Op(Operation::Badge(Op::Assign), &[]),
        (AttrType::Badge, "remove") => Parsed::Op(Operation::Badge(Op::Remove), &[]),
        _ => Parsed::NotHere,
    }
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile) -> Result<(), String> {
        match self {
            Op::Assign => profile.badges.insert(def.name.clone()),
            Op::Remove => profile.badges.remove(&def.name),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::enrich::testing::{errors, run};

    const VIP: &str = "[[attribute]]\nname = \"vip\"\nscope = \"visitor\"\ntype = \"badge\"\n";

    #[test]
    fn assigns_and_removes() {
        let assign = format!("{VIP}[[enrichment]]\nattribute = \"vip\"\nop = \"assign\"\n");
        assert!(run(&assign, &["{}"]).badges.contains("vip"));
        let both = format!("{assign}[[enrichment]]\nattribute = \"vip\"\nop = \"remove\"\nwhen = \"event:e\"\n");
        assert!(!run(&both, &["{}"]).badges.contains("vip"));
        let clear = format!("{VIP}[[enrichment]]\nattribute = \"vip\"\nop = \"clear\"\n");
        assert_eq!(
            errors(&clear),
            ["7:6: operation `clear` does not apply to badge attribute `vip` (use: assign, remove)"]
        );
    }
}
