//! The schemas an unqualified table name may resolve to on this
//! connection, so that a rule on `hr.*` sees `SET search_path = hr;
//! SELECT * FROM salaries`. The node cannot know which schema of the path
//! holds a table, nor whether a SET was rolled back, so it keeps every
//! schema the path has held on this connection (it only grows), and an
//! unqualified name is qualified with each. A path set to something only
//! known when it runs makes every schema possible (`*.table`, matched by
//! the table part of each rule's glob). The qualified names are matched,
//! not recorded: the record keeps the names as written.
use std::collections::BTreeSet;

use crate::record::statement::{SearchPathChange, SqlFacts};

pub struct SearchPath {
    schemas: BTreeSet<String>,
    any: bool,
    /// Bumped each time the set grows: statements prepared before were
    /// judged with fewer schemas.
    pub generation: u32,
    user: String,
}

impl SearchPath {
    /// The server's default path (`"$user", public`) and the catalog.
    pub fn new(user: &str) -> Self {
        let mut p = Self {
            schemas: BTreeSet::new(),
            any: false,
            generation: 0,
            user: user.to_ascii_lowercase(),
        };
        p.add(["$user", "public", "pg_catalog"].map(String::from).to_vec());
        p.generation = 0;
        p
    }

    fn add(&mut self, schemas: Vec<String>) {
        let before = self.schemas.len();
        for s in schemas {
            let s = if s == "$user" { self.user.clone() } else { s };
            self.schemas.insert(s);
        }
        if self.schemas.len() != before {
            self.generation += 1;
        }
    }

    /// Follows the statement's own change to the path, then qualifies its
    /// unqualified tables with every schema they may resolve to.
    pub fn follow(&mut self, facts: &mut SqlFacts) {
        match facts.search_path.clone() {
            Some(SearchPathChange::Set(s)) => self.add(s),
            Some(SearchPathChange::Unknown) if !self.any => {
                self.any = true;
                self.generation += 1;
            }
            _ => {}
        }
        let bare: Vec<String> = facts
            .tables
            .iter()
            .filter(|t| !t.contains('.'))
            .cloned()
            .collect();
        facts.resolved.clear();
        for t in bare {
            if self.any {
                facts.resolved.push(format!("*.{t}"));
            }
            for s in &self.schemas {
                facts.resolved.push(format!("{s}.{t}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::classify::classify;

    #[test]
    fn unqualified_tables_get_every_schema_the_path_has_held() {
        let mut p = SearchPath::new("ci");
        let mut f = classify("SELECT * FROM salaries");
        p.follow(&mut f);
        assert_eq!(f.tables, vec!["salaries"]);
        assert_eq!(
            f.resolved,
            vec!["ci.salaries", "pg_catalog.salaries", "public.salaries"]
        );
        let mut set = classify("SET search_path = hr");
        p.follow(&mut set);
        assert_eq!(p.generation, 1);
        let mut f = classify("SELECT * FROM salaries");
        p.follow(&mut f);
        assert!(f.resolved.contains(&"hr.salaries".to_string()), "{f:?}");
        // Set back: hr stays possible (a rolled-back SET, a function's).
        let mut reset = classify("RESET search_path");
        p.follow(&mut reset);
        let mut f = classify("SELECT * FROM salaries");
        p.follow(&mut f);
        assert!(f.resolved.contains(&"hr.salaries".to_string()), "{f:?}");
        // Qualified names stay as written.
        let mut f = classify("SELECT * FROM public.t");
        p.follow(&mut f);
        assert_eq!(f.tables, vec!["public.t"]);
        assert!(f.resolved.is_empty());
        // A path built at run time: any schema.
        let mut dynamic = classify("SELECT set_config('search_path', s, false) FROM conf");
        p.follow(&mut dynamic);
        let mut f = classify("SELECT * FROM salaries");
        p.follow(&mut f);
        assert!(f.resolved.contains(&"*.salaries".to_string()), "{f:?}");
        // In the same DO block as the read.
        let mut p = SearchPath::new("ci");
        let mut f = classify("DO $$ BEGIN SET search_path = hr; PERFORM * FROM salaries; END $$");
        p.follow(&mut f);
        assert!(f.resolved.contains(&"hr.salaries".to_string()), "{f:?}");
    }
}
